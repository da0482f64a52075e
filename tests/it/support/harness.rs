//! Per-test infrastructure: real NATS (JetStream) and Redis servers on free ports in a temp
//! folder, and `wagate` itself as a child process, so tests run in parallel and see nothing of
//! each other. Everything is killed when the handles drop.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use twilio::signature::compute_signature;

/// A free TCP port on loopback (bound then released; a tiny race that tests tolerate).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The nats-server binary: `WAGATE_TEST_NATS_SERVER`, the project venv's (2.10+), or PATH's.
pub fn nats_binary() -> PathBuf {
    if let Ok(p) = std::env::var("WAGATE_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

async fn wait_tcp(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} did not listen on port {port} within 15s");
}

/// Whether the server on `port` answers `say` with a reply starting with `expect`.
async fn greets(port: u16, say: &[u8], expect: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(say).await?;
        let mut got = vec![0; expect.len()];
        stream.read_exact(&mut got).await?;
        Ok::<_, std::io::Error>(got == expect)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), exchange).await,
        Ok(Ok(true))
    )
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// NATS and Redis for one test.
/// Where a test's wagate keeps its queues and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// NATS JetStream and Redis, each a real server process of the test's own.
    Distributed,
    /// One process with its embedded store in the test's data folder.
    Embedded,
}

impl Mode {
    /// The mode of the end-to-end suites: `WAGATE_TEST_MODE=embedded` or distributed.
    pub fn from_env() -> Mode {
        match std::env::var("WAGATE_TEST_MODE").as_deref() {
            Ok("embedded") => Mode::Embedded,
            _ => Mode::Distributed,
        }
    }
}

pub struct Servers {
    pub mode: Mode,
    pub nats_url: String,
    pub redis_url: String,
    pub redis_port: u16,
    nats_port: u16,
    nats: Option<Proc>,
    redis: Option<Proc>,
    /// Passwords the servers demand (restarts keep them).
    auth: ServerAuth,
    pub dir: tempfile::TempDir,
}

/// Credentials NATS and Redis demand, for tests of password handling.
#[derive(Clone, Default)]
pub struct ServerAuth {
    /// NATS user and password.
    pub nats: Option<(String, String)>,
    /// Redis `requirepass`.
    pub redis: Option<String>,
}

fn spawn_redis(port: u16, dir: &Path, auth: &ServerAuth) -> Child {
    let password: Vec<&str> = match &auth.redis {
        Some(p) => vec!["--requirepass", p],
        None => vec![],
    };
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(password)
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start redis-server (apt-get install redis-server)")
}

async fn spawn_nats(port: u16, store: &Path, auth: &ServerAuth) -> Proc {
    let user: Vec<&str> = match &auth.nats {
        Some((user, password)) => vec!["--user", user, "--pass", password],
        None => vec![],
    };
    let mut nats = Command::new(nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .args(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start nats-server: run scripts/test-deps, or set WAGATE_TEST_NATS_SERVER");
    wait_tcp(port, "nats-server", &mut nats).await;
    Proc(nats)
}

impl Servers {
    /// Starts both servers and waits until they accept connections.
    pub async fn start() -> Servers {
        Self::start_in(Mode::Distributed).await
    }

    /// What `mode` needs: both servers, or only a data folder for embedded mode.
    pub async fn start_in(mode: Mode) -> Servers {
        Self::start_with_auth(mode, ServerAuth::default()).await
    }

    /// Like [`Servers::start_in`], with servers that demand `auth`; the URLs carry it.
    pub async fn start_with_auth(mode: Mode, auth: ServerAuth) -> Servers {
        let dir = tempfile::tempdir().expect("tempdir");
        if mode == Mode::Embedded {
            return Servers {
                mode,
                nats_url: String::new(),
                redis_url: String::new(),
                redis_port: 0,
                nats_port: 0,
                nats: None,
                redis: None,
                auth,
                dir,
            };
        }
        let nats_userinfo = auth
            .nats
            .as_ref()
            .map_or(String::new(), |(u, p)| format!("{u}:{p}@"));
        let redis_userinfo = auth
            .redis
            .as_ref()
            .map_or(String::new(), |p| format!(":{p}@"));
        let redis_hello = match &auth.redis {
            Some(p) => (format!("AUTH {p}\r\n").into_bytes(), &b"+OK"[..]),
            None => (b"PING\r\n".to_vec(), &b"+PONG"[..]),
        };
        // A port found free can be taken by another test's server before ours binds it; then
        // what answers there is not ours, and both are started again on other ports.
        for _ in 0..5 {
            let nats_port = free_port();
            let redis_port = free_port();
            let nats = spawn_nats(nats_port, &dir.path().join("nats"), &auth).await;
            let mut redis = spawn_redis(redis_port, dir.path(), &auth);
            wait_tcp(redis_port, "redis-server", &mut redis).await;
            let redis = Proc(redis);
            if greets(nats_port, b"", b"INFO").await
                && greets(redis_port, &redis_hello.0, redis_hello.1).await
            {
                return Servers {
                    mode,
                    nats_url: format!("nats://{nats_userinfo}127.0.0.1:{nats_port}"),
                    redis_url: format!("redis://{redis_userinfo}127.0.0.1:{redis_port}/0"),
                    redis_port,
                    nats_port,
                    nats: Some(nats),
                    redis: Some(redis),
                    auth,
                    dir,
                };
            }
        }
        panic!("could not start nats-server and redis-server on free ports");
    }

    /// Kills redis-server (SIGKILL) and starts it again on the same port and data (AOF).
    pub async fn restart_redis(&mut self) {
        assert_eq!(self.mode, Mode::Distributed, "this test needs Redis");
        self.redis = None;
        let mut redis = spawn_redis(self.redis_port, self.dir.path(), &self.auth);
        wait_tcp(self.redis_port, "redis-server", &mut redis).await;
        self.redis = Some(Proc(redis));
    }

    /// Kills nats-server (SIGKILL), keeping its store.
    pub fn kill_nats(&mut self) {
        self.nats = None;
    }

    /// Starts nats-server again on the same port and store.
    pub async fn restart_nats(&mut self) {
        self.nats =
            Some(spawn_nats(self.nats_port, &self.dir.path().join("nats"), &self.auth).await);
    }

    /// The state of a JetStream stream (e.g. `WAGATE_INBOUND`), for white-box checks of what
    /// the bus holds: `messages` still stored (work queues drop acked ones), `last_sequence`
    /// ever stored.
    pub async fn stream_state(&self, name: &str) -> async_nats::jetstream::stream::State {
        assert_eq!(self.mode, Mode::Distributed, "this test needs NATS");
        let client = async_nats::connect(&self.nats_url).await.unwrap();
        let mut stream = async_nats::jetstream::new(client)
            .get_stream(name)
            .await
            .unwrap_or_else(|e| panic!("stream {name}: {e}"));
        stream.info().await.unwrap().state.clone()
    }

    /// A Redis connection for white-box checks (e.g. that no token is stored).
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        assert_eq!(self.mode, Mode::Distributed, "this test needs Redis");
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

/// The admin token every test wagate uses.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// A valid-looking Twilio account and token for tests.
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const AUTH_TOKEN: &str = "f3a9c1d2e4b5a6978877665544332211";
pub const SANDBOX: &str = "+14155238886";
/// As the value of a setting passed to [`Wagate::start`]: leave the variable out altogether
/// (an empty value is a value, and some settings must be absent, not empty).
pub const UNSET: &str = "<unset>";

/// A start that ended before the process was ready.
#[derive(Debug)]
pub struct Refused {
    /// How the process exited.
    pub status: std::process::ExitStatus,
    /// Everything it logged.
    pub logs: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wagate exited with {} before it was ready:\n{}",
            self.status, self.logs
        )
    }
}

/// A running `wagate` process.
pub struct Wagate {
    proc: Proc,
    role: String,
    env: Vec<(String, String)>,
    starts: usize,
    /// The soft limit of open files the process starts with, if not this process's own.
    open_files: Option<u64>,
    pub public_url: String,
    pub admin_url: String,
    pub log_path: PathBuf,
    pub http: reqwest::Client,
}

impl Wagate {
    /// Starts `wagate <role>` against `servers`, with Twilio's API at `twilio_base`, and waits
    /// until it is ready. `env` adds or overrides settings.
    pub async fn start(servers: &Servers, twilio_base: &str, env: &[(&str, &str)]) -> Wagate {
        Self::start_role("serve", servers, twilio_base, env).await
    }

    pub async fn start_role(
        role: &str,
        servers: &Servers,
        twilio_base: &str,
        env: &[(&str, &str)],
    ) -> Wagate {
        match Self::try_start_role(role, servers, twilio_base, env).await {
            Ok(w) => w,
            Err(why) => panic!("{why}"),
        }
    }

    /// As [`Wagate::start_role`], for a start that may be refused: the process's exit status
    /// and log when it exits before it is ready (a start that hangs still fails the test).
    pub async fn try_start_role(
        role: &str,
        servers: &Servers,
        twilio_base: &str,
        env: &[(&str, &str)],
    ) -> Result<Wagate, Refused> {
        Self::try_start_limited(role, servers, twilio_base, env, None).await
    }

    /// As [`Wagate::start_role`], the process starting with a soft limit of `open_files` open
    /// files (its hard limit stays this process's), as systemd starts a service; this process's
    /// own limit, which every test in the binary shares, is left as it is.
    pub async fn start_role_with_open_files(
        role: &str,
        servers: &Servers,
        twilio_base: &str,
        env: &[(&str, &str)],
        open_files: u64,
    ) -> Wagate {
        match Self::try_start_limited(role, servers, twilio_base, env, Some(open_files)).await {
            Ok(w) => w,
            Err(why) => panic!("{why}"),
        }
    }

    /// Starts the process on free ports; when another process took one of them between
    /// [`free_port`] and wagate's bind (the race that function tolerates), on new ones, twice
    /// at most. A test that names its own listeners gets its refusal.
    async fn try_start_limited(
        role: &str,
        servers: &Servers,
        twilio_base: &str,
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Result<Wagate, Refused> {
        let own_ports = env
            .iter()
            .any(|(k, _)| *k == "WAGATE_LISTEN" || *k == "WAGATE_ADMIN_LISTEN");
        let mut attempt = 1;
        loop {
            match Self::try_start_once(role, servers, twilio_base, env, open_files).await {
                Err(refused)
                    if attempt < 3
                        && !own_ports
                        && refused.logs.contains("Address already in use") =>
                {
                    attempt += 1;
                }
                started => return started,
            }
        }
    }

    async fn try_start_once(
        role: &str,
        servers: &Servers,
        twilio_base: &str,
        env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> Result<Wagate, Refused> {
        let port = free_port();
        let admin_port = free_port();
        let public_url = format!("http://127.0.0.1:{port}");
        let log_path = servers.dir.path().join(format!("wagate-{port}.log"));
        let mut all_env: Vec<(String, String)> = [
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("RUST_LOG", "info,async_nats=warn".into()),
            ("WAGATE_MASTER_KEY", test_master_key()),
            ("WAGATE_ADMIN_TOKEN", ADMIN_TOKEN.into()),
            ("WAGATE_PUBLIC_URL", public_url.clone()),
            ("WAGATE_LISTEN", format!("127.0.0.1:{port}")),
            ("WAGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
            ("WAGATE_TWILIO_API_BASE", twilio_base.into()),
            ("WAGATE_TWILIO_MESSAGING_BASE", twilio_base.into()),
            ("WAGATE_TWILIO_CONTENT_BASE", twilio_base.into()),
            (
                "WAGATE_DATA_DIR",
                servers.dir.path().join("data").display().to_string(),
            ),
            ("WAGATE_AGENT_RETRY", "100ms,200ms".into()),
            ("WAGATE_SEND_RETRY", "100ms,200ms".into()),
            ("WAGATE_SHUTDOWN_GRACE_MS", "2000".into()),
            // Every test channel is on the Sandbox's number, which Twilio paces at a message
            // every 3 s: the suites would take hours. The setting, not an `mps` on each
            // channel, so that channels made any way (the console's Deploy form, a test's own
            // JSON) are covered; the pacing suite sets its own rates.
            ("WAGATE_SANDBOX_MPS", "1000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if servers.mode == Mode::Distributed {
            all_env.push(("WAGATE_NATS_URL".into(), servers.nats_url.clone()));
            all_env.push(("WAGATE_REDIS_URL".into(), servers.redis_url.clone()));
        }
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let unset: Vec<&str> = env
            .iter()
            .filter(|(_, v)| *v == UNSET)
            .map(|(k, _)| *k)
            .collect();
        all_env.retain(|(k, _)| !unset.contains(&k.as_str()));
        let mut w = Wagate {
            proc: Proc(spawn_wagate(role, &all_env, &log_path, open_files)),
            role: role.to_owned(),
            env: all_env,
            public_url,
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            log_path,
            http: reqwest::Client::new(),
            starts: 1,
            open_files,
        };
        w.wait_ready().await?;
        Ok(w)
    }

    /// Starts the process again (after [`Wagate::kill`]) with the same role, ports and settings.
    pub async fn restart(&mut self) {
        self.kill();
        self.proc = Proc(spawn_wagate(
            &self.role,
            &self.env,
            &self.log_path,
            self.open_files,
        ));
        self.starts += 1;
        if let Err(why) = self.wait_ready().await {
            panic!("{why}");
        }
    }

    /// Waits for this start's `wagate ready`; the exit status and log if the process exits
    /// first.
    async fn wait_ready(&mut self) -> Result<(), Refused> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.logs().matches("wagate ready").count() >= self.starts {
                return Ok(());
            }
            if let Ok(Some(status)) = self.proc.0.try_wait() {
                return Err(Refused {
                    status,
                    logs: self.logs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("wagate was not ready within 30s:\n{}", self.logs());
    }

    /// The process id, to read what the kernel says about the process.
    pub fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited 0, and how long it took.
    pub async fn terminate(&mut self) -> (bool, Duration) {
        let started = Instant::now();
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        loop {
            if let Ok(Some(status)) = self.proc.0.try_wait() {
                return (status.success(), started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "wagate ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
    }

    /// An admin call with the bearer token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.admin_url))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// Creates an echo agent with an enabled WhatsApp channel on the test account.
    pub async fn echo_agent(&self, id: &str) {
        self.agent(id, serde_json::json!({"kind": "echo"})).await;
        self.channel(id, true).await;
    }

    /// Creates or replaces an agent with `backend`.
    pub async fn agent(&self, id: &str, backend: serde_json::Value) {
        let r = self
            .admin(reqwest::Method::PUT, &format!("/v1/agents/{id}"))
            .json(&serde_json::json!({"name": id, "backend": backend}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }

    /// Saves the agent's WhatsApp channel on the test account.
    pub async fn channel(&self, id: &str, enabled: bool) -> serde_json::Value {
        let r = self
            .admin(reqwest::Method::PUT, &format!("/v1/agents/{id}/whatsapp"))
            .json(&serde_json::json!({
                "account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                "phone_number": SANDBOX, "enabled": enabled
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        r.json().await.unwrap()
    }

    /// The Prometheus text of `/metrics`, from the admin listener (without a token, as
    /// Prometheus scrapes it).
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one series of `/metrics` (name and labels exactly as exported, e.g.
    /// `wagate_inbound_duplicates_total`); 0 for a counter never incremented, which the
    /// exporter does not list.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// GETs an admin path and returns its JSON, asserting a 200.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.admin_text(path).await).unwrap()
    }

    /// `GET path` of the admin API as text, which must answer 200.
    pub async fn admin_text(&self, path: &str) -> String {
        let r = self.admin(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.text().await.unwrap()
    }

    /// The session of `phone` with `agent`, as the admin API shows it.
    pub async fn session(&self, agent: &str, phone: &str) -> serde_json::Value {
        self.admin_json(&format!("/v1/agents/{agent}/sessions/{phone}"))
            .await
    }

    /// The contents of a session's turns, oldest first.
    pub async fn session_contents(&self, agent: &str, phone: &str) -> Vec<String> {
        self.session(agent, phone).await["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["content"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The leads of `agent`.
    pub async fn leads(&self, agent: &str) -> Vec<serde_json::Value> {
        self.admin_json(&format!("/v1/agents/{agent}/leads"))
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits until `done` holds, or fails showing this process's log.
    pub async fn wait_until(&self, timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The path of an agent's inbound webhook.
    pub fn inbound_path(agent: &str) -> String {
        format!("/webhooks/twilio/whatsapp/{agent}")
    }

    /// Posts `fields` to `path`, signed with `token` as Twilio would.
    pub async fn post_signed(
        &self,
        path: &str,
        fields: &[(String, String)],
        token: &str,
    ) -> reqwest::Response {
        let url = format!("{}{path}", self.public_url);
        let sig = compute_signature(token.as_bytes(), &url, fields);
        self.http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", sig)
            .body(twilio::form::encode(fields))
            .send()
            .await
            .unwrap()
    }

    /// Posts an inbound WhatsApp text, signed with the test token.
    pub async fn inbound(
        &self,
        agent: &str,
        sid: &str,
        from: &str,
        body: &str,
    ) -> reqwest::Response {
        self.post_signed(
            &Self::inbound_path(agent),
            &inbound_form(sid, from, body),
            AUTH_TOKEN,
        )
        .await
    }
}

fn spawn_wagate(
    role: &str,
    env: &[(String, String)],
    log_path: &Path,
    open_files: Option<u64>,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wagate"));
    cmd.arg(role)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(soft) = open_files {
        limit_open_files(&mut cmd, soft);
    }
    cmd.spawn().expect("cannot start wagate")
}

/// Makes the process `cmd` starts begin with a soft limit of `soft` open files (at most its
/// hard limit, which it keeps), set in the child between fork and exec.
#[cfg(target_os = "linux")]
fn limit_open_files(cmd: &mut Command, soft: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    use std::os::unix::process::CommandExt;
    let hard = getrlimit(Resource::Nofile).maximum;
    let limit = Rlimit {
        current: Some(hard.map_or(soft, |h| h.min(soft))),
        maximum: hard,
    };
    // SAFETY: setrlimit is a single system call, safe between fork and exec; nothing is
    // allocated or locked in the child.
    unsafe {
        cmd.pre_exec(move || setrlimit(Resource::Nofile, limit).map_err(std::io::Error::from));
    }
}

#[cfg(not(target_os = "linux"))]
fn limit_open_files(_cmd: &mut Command, _soft: u64) {
    panic!("a child's limit of open files is only set on Linux");
}

/// Runs `wagate args` with only `env` (and `PATH`) to its end, for commands that finish or
/// processes that must refuse to start: whether it succeeded, and stdout then stderr.
pub fn run_wagate(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wagate"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A process that should have refused to start but did not is killed after a deadline, and
    // the test fails with its output instead of hanging.
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wagate");
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for wagate") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    match status {
        Some(status) => (status.success(), text),
        None => panic!("wagate {args:?} was still running after 30 s: {text}"),
    }
}

/// One last message from each of `users` (`(phone, MessageSid)`), with the text
/// `"<phone> last"`, delivered like Twilio: a barrier for tests that must show nothing more
/// arrives for the earlier messages. A conversation's replies go out in order, so once each
/// user's last message is answered, a late duplicate of an earlier one would have shown.
pub async fn deliver_last_messages(url: &str, users: &[(String, String)]) {
    let http = reqwest::Client::new();
    let sends = users.iter().map(|(user, sid)| {
        let fields = inbound_form(sid, user, &format!("{user} last"));
        let http = http.clone();
        async move { deliver_like_twilio(&http, url, &fields).await }
    });
    futures::future::join_all(sends).await;
}

/// Posts an inbound form like Twilio: signed with the test token, and again until it is
/// answered 200 (Twilio retries what fails), for tests that kill processes under traffic.
pub async fn deliver_like_twilio(http: &reqwest::Client, url: &str, fields: &[(String, String)]) {
    let sig = compute_signature(AUTH_TOKEN.as_bytes(), url, fields);
    let body = twilio::form::encode(fields);
    for _ in 0..600 {
        let r = http
            .post(url)
            .header("x-twilio-signature", &sig)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.clone())
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("a message was never accepted");
}

/// The lines of the echo replies Twilio received, per recipient (`whatsapp:+…`), in order. With
/// burst coalescing one reply can echo several messages, one per line, so tests of "each
/// message answered once, in order" compare lines, not replies.
pub fn echoed_lines(
    sent: &[crate::support::fake_twilio::SentMessage],
) -> std::collections::HashMap<String, Vec<String>> {
    let mut lines: std::collections::HashMap<String, Vec<String>> =
        std::collections::HashMap::new();
    for m in sent {
        let body = m.body.clone().unwrap_or_default();
        lines
            .entry(m.to.clone())
            .or_default()
            .extend(body.lines().map(str::to_owned));
    }
    lines
}

/// A fixed 64-byte master key for tests.
pub fn test_master_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([7u8; 64])
}

/// A message sid from a number, `SM` + 32 hex digits.
pub fn sid(n: u64) -> String {
    format!("SM{n:032x}")
}

/// The form Twilio posts for an inbound WhatsApp text (fields as in Twilio's documentation).
pub fn inbound_form(sid: &str, from: &str, body: &str) -> Vec<(String, String)> {
    let wa_id = from.trim_start_matches('+');
    [
        ("SmsMessageSid", sid),
        ("NumMedia", "0"),
        ("ProfileName", "Test User"),
        ("MessageType", "text"),
        ("SmsSid", sid),
        ("WaId", wa_id),
        ("SmsStatus", "received"),
        ("Body", body),
        ("To", &format!("whatsapp:{SANDBOX}")),
        ("NumSegments", "1"),
        ("ReferralNumMedia", "0"),
        ("MessageSid", sid),
        ("AccountSid", ACCOUNT_SID),
        ("From", &format!("whatsapp:{from}")),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's world: servers, fake Twilio with the test account, and a ready `wagate serve`.
pub struct World {
    pub servers: Servers,
    pub twilio: crate::support::fake_twilio::FakeTwilio,
    pub wagate: Wagate,
}

impl World {
    pub async fn start() -> World {
        Self::start_with(&[]).await
    }

    /// A world in the suites' mode ([`Mode::from_env`]).
    pub async fn start_with(env: &[(&str, &str)]) -> World {
        Self::start_in(Mode::from_env(), env).await
    }

    /// A world in `mode`.
    pub async fn start_in(mode: Mode, env: &[(&str, &str)]) -> World {
        let servers = Servers::start_in(mode).await;
        let twilio = crate::support::fake_twilio::FakeTwilio::start().await;
        twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
        let wagate = Wagate::start(&servers, &twilio.base_url, env).await;
        World {
            servers,
            twilio,
            wagate,
        }
    }

    /// A world in the suites' mode whose wagate starts with a soft limit of `open_files` open
    /// files (see [`Wagate::start_role_with_open_files`]).
    pub async fn start_with_open_files(open_files: u64, env: &[(&str, &str)]) -> World {
        let servers = Servers::start_in(Mode::from_env()).await;
        let twilio = crate::support::fake_twilio::FakeTwilio::start().await;
        twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
        let wagate = Wagate::start_role_with_open_files(
            "serve",
            &servers,
            &twilio.base_url,
            env,
            open_files,
        )
        .await;
        World {
            servers,
            twilio,
            wagate,
        }
    }
}

/// Posts Twilio's status callback for `message_sid` to the agent `demo`, signed.
pub async fn status_callback(w: &World, message_sid: &str, status: &str, code: Option<u32>) {
    let mut form = vec![
        ("MessageSid".to_owned(), message_sid.to_owned()),
        ("MessageStatus".to_owned(), status.to_owned()),
        ("AccountSid".to_owned(), ACCOUNT_SID.to_owned()),
        ("ChannelPrefix".to_owned(), "whatsapp".to_owned()),
    ];
    form.extend(code.map(|c| ("ErrorCode".to_owned(), c.to_string())));
    let r = w
        .wagate
        .post_signed("/webhooks/twilio/whatsapp/demo/status", &form, AUTH_TOKEN)
        .await;
    assert!(r.status().is_success(), "{status}: {}", r.status());
}
