#!/bin/sh
# Run once by the postgres image on an empty data directory
# (/docker-entrypoint-initdb.d): the worker's own role, which owns its
# database (so that it can migrate it) and nothing else; it is not a
# superuser, cannot create roles or databases, and its password comes from
# a secret file.
set -eu
password=$(cat /run/secrets/postgres_worker_password)
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres \
  -v password="$password" -f /etc/rotation-worker/worker-role.sql
