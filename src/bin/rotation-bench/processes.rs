//! The processes the benchmark runs: its own nats-servers and the timed
//! worker.

use super::*;

/// The benchmark's own nats-servers (one, or three in a cluster), killed
/// on drop.
pub(super) struct PrivateNats {
    pub(super) children: Vec<std::process::Child>,
    /// The seed list, as `NATS_URL` takes it.
    pub(super) url: String,
    /// The servers' stores.
    pub(super) dir: tempfile::TempDir,
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts one nats-server with JetStream on a free port, or with
/// `cluster`, three (`n1`..`n3`) routed into one JetStream cluster, each
/// with a store of its own, and waits until JetStream answers.
pub(super) async fn start_nats(cluster: bool, sync: NatsSync) -> anyhow::Result<PrivateNats> {
    let dir = tempfile::tempdir()?;
    // `sync_interval` has no command-line flag; the flags below take
    // precedence over the rest of a file.
    let config = dir.path().join("sync.conf");
    std::fs::write(&config, "jetstream { sync_interval: always }\n")?;
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let nodes = if cluster { 3 } else { 1 };
    let routes = (0..nodes)
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let route_url = |port: &u16| format!("nats://127.0.0.1:{port}");
    let mut private = PrivateNats {
        children: Vec::new(),
        url: String::new(),
        dir,
    };
    let mut urls = Vec::new();
    for (i, own) in routes.iter().enumerate() {
        let port = free_port()?;
        let store = private.dir.path().join(format!("n{}", i + 1));
        let mut command = std::process::Command::new(&bin);
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store);
        if sync == NatsSync::Always {
            command.arg("-c").arg(&config);
        }
        if cluster {
            let others: Vec<String> = routes.iter().filter(|p| *p != own).map(route_url).collect();
            command
                .args(["-n", &format!("n{}", i + 1), "--cluster_name", "bench"])
                .args(["-cluster", &route_url(own), "-routes", &others.join(",")]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {bin} (set NATS_SERVER_BIN)"))?;
        private.children.push(child);
        wait_for_port(port).await?;
        urls.push(format!("nats://127.0.0.1:{port}"));
    }
    private.url = urls.join(",");
    // A cluster answers JetStream requests once it has elected a leader.
    // `$JS.API.INFO` by hand: the client's account type does not read every
    // reply of nats-server 2.9.
    let client = connect(&private.url).await?;
    let mut answered = false;
    for _ in 0..300 {
        if let Ok(reply) = client.request("$JS.API.INFO", "".into()).await {
            let info: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            if info.get("error").is_none() {
                answered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !answered {
        bail!("JetStream did not answer");
    }
    if !cluster {
        return Ok(private);
    }
    // A meta leader elected by two nodes answers before the third has
    // joined, and until then refuses to place three replicas ("no suitable
    // peers for placement"): wait until a stream of three can be placed.
    let js = async_nats::jetstream::new(client);
    let mut last = String::new();
    for _ in 0..300 {
        let probe = async_nats::jetstream::stream::Config {
            name: "BENCH_PROBE".into(),
            subjects: vec!["bench.probe".into()],
            num_replicas: 3,
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        match js.create_stream(probe).await {
            Ok(_) => {
                js.delete_stream("BENCH_PROBE").await?;
                return Ok(private);
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the cluster placed no stream of three replicas: {last}")
}

pub(super) async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("nats-server did not start on port {port}")
}

/// Connects to any server of a comma-separated list.
pub(super) async fn connect(list: &str) -> anyhow::Result<async_nats::Client> {
    let addrs = list
        .split(',')
        .map(|url| url.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(async_nats::connect(addrs).await?)
}

/// A running worker: its pid, and when it said it was ready.
pub(super) struct Worker {
    pub(super) child: tokio::process::Child,
    pub(super) ready_after: Duration,
}

impl Worker {
    pub(super) async fn start(
        bin: &Path,
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut child = tokio::process::Command::new(bin)
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let ready_after = loop {
            match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
                Ok(Ok(Some(line))) if line.contains("rotation-worker ready") => {
                    break started.elapsed();
                }
                Ok(Ok(Some(_))) => {}
                _ => bail!("the worker did not become ready"),
            }
        };
        // Keep reading its log (into `log`, or dropped) so that it never
        // blocks.
        let mut file = match log {
            Some(path) => Some(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?,
            ),
            None => None,
        };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(file) = file.as_mut() {
                    let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        Ok(Self { child, ready_after })
    }

    /// The CPU time (user and system) the worker has used so far, in
    /// seconds, from `/proc/PID/stat` (in clock ticks).
    pub(super) fn cpu_seconds(&self) -> f64 {
        self.child
            .id()
            .map_or(0.0, |pid| cpu_seconds_of(&pid.to_string()))
    }

    /// The bytes the worker has had written to storage so far
    /// (`write_bytes` of `/proc/PID/io`): with SQLite, its log and
    /// database files.
    pub(super) fn disk_write_bytes(&self) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/io"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The peak resident memory so far, in KiB.
    pub(super) fn peak_rss_kb(&self) -> u64 {
        self.memory("VmHWM:")
    }

    /// The resident memory now, in KiB.
    pub(super) fn rss_kb(&self) -> u64 {
        self.memory("VmRSS:")
    }

    /// The worker's open file descriptors, from `/proc/PID/fd`.
    pub(super) fn open_fds(&self) -> u64 {
        self.fd_targets().len() as u64
    }

    /// The worker's descriptors open on `file` (an absolute path), or
    /// `None` when they cannot be read.
    pub(super) fn fds_on(&self, file: &Path) -> Option<u64> {
        self.child.id()?;
        Some(self.fd_targets().iter().filter(|t| *t == file).count() as u64)
    }

    /// What each of the worker's descriptors points at.
    fn fd_targets(&self) -> Vec<PathBuf> {
        let Some(pid) = self.child.id() else {
            return Vec::new();
        };
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| {
                entries
                    .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A line of `/proc/PID/status`, in KiB.
    pub(super) fn memory(&self, field: &str) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}

/// The CPU time (user and system) process `pid` (or `self`) has used so
/// far, in seconds, from `/proc/PID/stat` (in clock ticks).
pub(super) fn cpu_seconds_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is the
    // first, utime and stime the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok());
    let hz = clock_ticks_per_second();
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / hz
}
