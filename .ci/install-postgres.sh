#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries for tests/test_postgres_mlflow.py, which starts its
# own throw-away server (initdb + pg_ctl on 127.0.0.1, a free port, a temporary data directory).
# Idempotent: does nothing when a server binary is already installed. Called by .ci/run.
set -euo pipefail

have_postgres() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && id postgres >/dev/null 2>&1
}

if have_postgres; then
    echo "postgresql already installed: $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    sudo=sudo
else
    sudo=
fi

export DEBIAN_FRONTEND=noninteractive
# Debian's postinst creates and starts a "main" cluster on port 5432; the tests never use it
# (they run their own server on a free port), so its presence or absence does not matter.
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null

have_postgres || { echo "postgresql installed but initdb or the postgres user is missing" >&2; exit 1; }
echo "installed $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
