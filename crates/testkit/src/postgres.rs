//! A real PostgreSQL server as a child process on a free loopback port, with its data
//! and unix sockets in a temporary directory removed on drop.
//!
//! The binaries are Debian's (`apt-get install postgresql`): the newest
//! `/usr/lib/postgresql/*/bin`, or the directory in `NETBORE_POSTGRES_BIN`. PostgreSQL
//! refuses to run as root, and tests run as root in CI: then `initdb` and `postgres` run
//! as the `postgres` system user (the package creates it; `nobody` otherwise) through
//! `setpriv`, which execs in place, so the child is the server itself and stopping it
//! stops the server. The temporary directory is handed to that user.
//!
//! The superuser is [`PostgresServer::USER`] with password [`PostgresServer::PASSWORD`];
//! TCP connections need the password (SCRAM), as a deployment's would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for `initdb` plus the server to accept connections.
pub const POSTGRES_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the server to stop after SIGINT before it is killed.
pub const POSTGRES_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running PostgreSQL; stopped, and its data removed, when dropped.
pub struct PostgresServer {
    child: Option<Child>,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The system user the server runs as when this process is root.
    run_as: Option<(u32, u32)>,
}

impl PostgresServer {
    /// The superuser tests connect as.
    pub const USER: &'static str = "netbore";
    /// Its password.
    pub const PASSWORD: &'static str = "test-postgres-password";
    /// The database tests use.
    pub const DATABASE: &'static str = "postgres";

    /// Creates a cluster (`initdb`) and starts it on a free port.
    pub fn start() -> PostgresServer {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let run_as = if is_root() {
            Some(unprivileged_user())
        } else {
            None
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("handing the temporary directory to the PostgreSQL user");
        }
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PostgresServer::PASSWORD).unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"), run_as)
            .arg("-D")
            .arg(&data)
            .args(["-U", PostgresServer::USER, "--auth-local=trust"])
            .args(["--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .output()
            .expect("initdb runs (apt-get install postgresql)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::free_port();
        let mut pg = PostgresServer {
            child: None,
            port,
            dir,
            bin,
            run_as,
        };
        pg.spawn();
        pg
    }

    /// `postgres://USER@127.0.0.1:PORT/DATABASE`, without the password.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            PostgresServer::USER,
            self.port,
            PostgresServer::DATABASE
        )
    }

    /// [`PostgresServer::url`] with the password in it.
    pub fn url_with_password(&self) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            PostgresServer::USER,
            PostgresServer::PASSWORD,
            self.port,
            PostgresServer::DATABASE
        )
    }

    /// Runs SQL through `psql` over the unix socket (as the superuser); its output.
    pub fn psql(&self, sql: &str) -> String {
        let out = command(&self.bin.join("psql"), self.run_as)
            .args(["-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", PostgresServer::USER])
            .args([
                "-d",
                PostgresServer::DATABASE,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops the server (fast shutdown); its data stays for [`PostgresServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + POSTGRES_STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = command(&self.bin.join("postgres"), self.run_as)
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.dir.path())
            // Speed over durability: the data dies with the test.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .args(["-c", "shared_buffers=16MB"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres runs");
        self.child = Some(child);
        let deadline = Instant::now() + POSTGRES_START_TIMEOUT;
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("postgres exited at start ({st}); run it by hand to see why");
            }
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The newest `/usr/lib/postgresql/*/bin`, or `NETBORE_POSTGRES_BIN`.
fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("NETBORE_POSTGRES_BIN") {
        return PathBuf::from(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .expect("PostgreSQL under /usr/lib/postgresql/*/bin (apt-get install postgresql) or NETBORE_POSTGRES_BIN")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// uid and gid of `postgres`, or of `nobody` where that user does not exist.
fn unprivileged_user() -> (u32, u32) {
    let id = |user: &str, flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, user]).output().ok()?;
        if !o.status.success() {
            return None;
        }
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    ["postgres", "nobody"]
        .iter()
        .find_map(|u| Some((id(u, "-u")?, id(u, "-g")?)))
        .expect("a 'postgres' or 'nobody' user to run PostgreSQL as (it refuses root)")
}

/// `program`, run as `run_as` (uid, gid) through `setpriv` when given.
fn command(program: &Path, run_as: Option<(u32, u32)>) -> Command {
    match run_as {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            // The user's home may not be readable; stay in the temporary directory.
            c.current_dir("/tmp");
            c
        }
        None => Command::new(program),
    }
}
