//! The process's memory allocator: jemalloc, for Rust's allocations and
//! C's (`malloc` itself, so SQLite's too), with its settings built in.
//!
//! An event's path allocates and frees about 140 small blocks, many of
//! them on another thread than the one that allocated them (a message is
//! read on the connection's task and dropped on a lane's). glibc's
//! allocator spent about a third of the worker's CPU on them, mostly
//! outside its per-thread caches; jemalloc's per-thread caches and size
//! classes take about 30% off the worker's CPU per drained event for
//! about 1 MiB more at the drain's peak (docs/performance.md, measured
//! choices).
//!
//! The settings: one arena (`narenas:1`), since with two cores more
//! arenas only spread the same blocks over more pages; freed pages handed
//! back to the system after about a second (`dirty_decay_ms:1000`), not
//! at once (a system call per free run, which cost more CPU than glibc)
//! nor after ten (the default, which holds the drain's pages);
//! `muzzy_decay_ms:0` skips the intermediate lazily-freed state. The
//! `MALLOC_CONF` environment variable overrides them at start, as
//! jemalloc documents.

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read by jemalloc from the C symbol `malloc_conf`
/// (a `const char *`) when it starts.
#[cfg(not(target_env = "msvc"))]
#[repr(transparent)]
pub struct Settings(*const std::ffi::c_char);

// SAFETY: the pointer is to a constant, never written.
#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code)]
unsafe impl Sync for Settings {}

/// The settings jemalloc reads (see the module's documentation).
#[cfg(not(target_env = "msvc"))]
#[allow(unsafe_code, non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: Settings =
    Settings(c"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// Call first thing in `main` (the worker's binary and `rotation-bench`,
/// so that what the benchmark does alone pays the allocator as the worker
/// does). It keeps the settings in the binary: a symbol that nothing
/// refers to may be left out of the link, and jemalloc would then start
/// with its defaults without a word.
pub fn install() {
    #[cfg(not(target_env = "msvc"))]
    std::hint::black_box(&malloc_conf);
}

#[cfg(all(test, not(target_env = "msvc")))]
mod tests {
    /// Reads a jemalloc option by name.
    #[allow(unsafe_code)]
    fn option<T: Default>(name: &std::ffi::CStr) -> T {
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: `value` and `len` describe a buffer of the option's size
        // (checked by jemalloc, which refuses a length that differs); no
        // new value is written.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&raw mut value).cast(),
                &raw mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl {name:?}");
        value
    }

    #[test]
    fn jemalloc_runs_with_the_settings_built_in() {
        super::install();
        assert_eq!(option::<u32>(c"opt.narenas"), 1);
        assert_eq!(option::<isize>(c"opt.dirty_decay_ms"), 1000);
        assert_eq!(option::<isize>(c"opt.muzzy_decay_ms"), 0);
        // And C's `malloc` is jemalloc's: 20 bytes take jemalloc's size
        // class of 32 (glibc's allocator would give 24).
        // SAFETY: a block measured and freed by the allocator it came from.
        #[allow(unsafe_code)]
        unsafe {
            let block = libc::malloc(20);
            assert!(!block.is_null());
            assert_eq!(libc::malloc_usable_size(block), 32);
            libc::free(block);
        }
    }
}
