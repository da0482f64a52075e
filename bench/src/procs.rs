//! The processes a benchmark runs beside itself (nats-server, redis-server, wagate, node), each
//! killed when its handle drops, and what the kernel says each one cost (CPU time, peak RSS).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A free TCP port on loopback (bound, then released for the child to take).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The repository root, where `target/`, `.venv/` and `bench/express/` are.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A child process of the bench; killed (SIGKILL) and reaped on drop.
pub struct Proc {
    /// What it is, for error messages and the report.
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `command`, sending its stdout and stderr to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Proc> {
        let out = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    /// The exit status, once the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// The process id, for /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process accepts TCP connections on `port`.
    pub async fn wait_port(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited early with {status}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("{} did not listen on port {port} within 30 s", self.name)
    }

    /// CPU time (user + system, all threads) used so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds_of(&self.pid().to_string())
    }

    /// Peak resident set size so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> Result<f64> {
        self.status_mib("VmHWM:")
    }

    /// Resident set size now (VmRSS), in MiB.
    pub fn rss_mib(&self) -> Result<f64> {
        self.status_mib("VmRSS:")
    }

    fn status_mib(&self, field: &str) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .with_context(|| format!("no {field} in /proc status"))?;
        Ok(kib / 1024.0)
    }
}

/// CPU time (user + system, all threads) of process `pid` ("self" for this one), in seconds.
fn cpu_seconds_of(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15, and
    // the first field after the name is field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// CPU time of the bench process itself (the load generator and the fakes), in seconds.
pub fn own_cpu_seconds() -> Result<f64> {
    cpu_seconds_of("self")
}

impl Proc {
    /// Kills the process and whatever it started (a profiler given as a
    /// `WAGATE_BENCH_WRAP_<ROLE>` wrapper runs wagate as its child), then reaps it.
    pub fn stop(&mut self) {
        let descendants = descendants(self.pid());
        let _ = self.child.kill();
        if !descendants.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(descendants.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.wait();
    }
}

/// The processes below `pid`, from `/proc/<pid>/task/<tid>/children`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                queue.push(child);
            }
        }
    }
    found
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The NATS and Redis of one benchmark, fresh in their folder, on free ports: one nats-server
/// with JetStream and one redis-server, or clusters of them ([`crate::clusters`]).
pub struct Servers {
    /// `WAGATE_NATS_URL`: every server, comma-separated.
    pub nats_url: String,
    /// `WAGATE_REDIS_URL`: every node, comma-separated.
    pub redis_url: String,
    /// The nats-server processes.
    pub nats: Vec<Proc>,
    /// The redis-server processes.
    pub redis: Vec<Proc>,
    /// What wagate must be told besides the URLs (`WAGATE_REDIS_CLUSTER`, replicas).
    pub env: Vec<(String, String)>,
    /// Their data (JetStream's stores, Redis's AOF): gigabytes after P1, removed on drop; the
    /// logs beside it stay.
    pub data: Vec<PathBuf>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for p in self.nats.iter_mut().chain(self.redis.iter_mut()) {
            p.stop();
        }
        for path in &self.data {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

impl Servers {
    /// Starts one of each: JetStream on disk with nats-server's defaults, Redis with its AOF
    /// fsync'd every second (Redis's recommended durability for AOF).
    pub async fn start(dir: &Path) -> Result<Servers> {
        Self::start_wrapped(dir, &[]).await
    }

    /// [`Self::start`] with redis-server run by `redis_wrapper` (callgrind, for P5), when it is
    /// not empty.
    pub async fn start_wrapped(dir: &Path, redis_wrapper: &[String]) -> Result<Servers> {
        std::fs::create_dir_all(dir)?;
        let nats_port = free_port()?;
        let mut nats_cmd = Command::new(nats_binary());
        nats_cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &nats_port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(dir.join("nats"));
        let mut nats = Proc::spawn("nats-server", nats_cmd, &dir.join("nats.log"))?;
        nats.wait_port(nats_port).await?;
        let redis_port = free_port()?;
        let mut redis = redis_server(dir, redis_port, "redis-aof", &[], redis_wrapper)?;
        redis.wait_port(redis_port).await?;
        Ok(Servers {
            nats_url: format!("nats://127.0.0.1:{nats_port}"),
            redis_url: format!("redis://127.0.0.1:{redis_port}/0"),
            nats: vec![nats],
            redis: vec![redis],
            env: vec![],
            data: vec![dir.join("nats"), dir.join("redis-aof")],
        })
    }

    /// CPU time of every nats-server so far, in seconds.
    pub fn nats_cpu_seconds(&self) -> Result<f64> {
        self.nats.iter().map(Proc::cpu_seconds).sum()
    }

    /// CPU time of every redis-server so far, in seconds.
    pub fn redis_cpu_seconds(&self) -> Result<f64> {
        self.redis.iter().map(Proc::cpu_seconds).sum()
    }
}

/// A redis-server on `port` keeping its AOF (fsync'd every second) in `dir/aof`, logging to
/// `dir/redis-<port>.log`, with `extra` arguments, run by `wrapper` when it is not empty.
pub fn redis_server(
    dir: &Path,
    port: u16,
    aof: &str,
    extra: &[String],
    wrapper: &[String],
) -> Result<Proc> {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg("redis-server");
            cmd
        }
        None => Command::new("redis-server"),
    };
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ])
        .arg("--dir")
        .arg(dir)
        .args(["--appenddirname", aof])
        .args(extra);
    Proc::spawn("redis-server", cmd, &dir.join(format!("redis-{port}.log")))
}

/// The nats-server binary: the project venv's (2.15, installed by scripts/test-deps) or PATH's.
pub fn nats_binary() -> PathBuf {
    let venv = repo().join(".venv/bin/nats-server");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("nats-server")
    }
}

/// First line of `program --version`-like output, for the report.
pub fn version_of(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}
