//! The data folder's files: private to their owner (tightened when they were not), and a
//! database file that is empty, not a database, cut short or damaged inside a stored record is
//! a start-up error naming the file, never a panic and never a silently empty database.

use crate::support;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{
    fake_twilio::FakeTwilio,
    harness::{ACCOUNT_SID, AUTH_TOKEN, Mode, Proc, Servers, Wagate, free_port, sid},
};

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `wagate serve` in embedded mode on `data` with nothing else configured, so that it makes
/// (or reads) its master key and admin token files; its log goes to `log`.
fn serve(data: &Path, log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_wagate"))
            .arg("serve")
            .env_clear()
            .env("WAGATE_DATA_DIR", data)
            .env("WAGATE_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("WAGATE_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start wagate"),
    )
}

/// Waits for `wagate ready` in `log`, failing if the process exits first.
async fn wait_ready(proc: &mut Proc, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("wagate ready") {
            return;
        }
        if let Some(status) = proc.0.try_wait().unwrap() {
            panic!("wagate exited with {status}:\n{text}");
        }
        assert!(Instant::now() < deadline, "not ready within 30 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Stops a ready process with SIGTERM and waits for its exit.
async fn stop(proc: &mut Proc) {
    let pid = proc.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "wagate ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_data_folder_and_its_files_are_private_and_loose_ones_are_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("parent").join("data");
    let files = ["wagate.redb", "master.key", "admin.token"].map(|f| data.join(f));
    let log = dir.path().join("first.log");
    let mut first = serve(&data, &log);
    wait_ready(&mut first, &log).await;
    assert_eq!(mode_of(&data), 0o700, "the data folder");
    for file in &files {
        assert_eq!(mode_of(file), 0o600, "{}", file.display());
    }
    stop(&mut first).await;

    // As an older wagate, a copy or a permissive umask would have left them.
    set_mode(&data, 0o755);
    for file in &files {
        set_mode(file, 0o644);
    }
    let log = dir.path().join("second.log");
    let mut second = serve(&data, &log);
    wait_ready(&mut second, &log).await;
    assert_eq!(mode_of(&data), 0o700, "the data folder, tightened");
    for file in &files {
        assert_eq!(mode_of(file), 0o600, "{}, tightened", file.display());
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("made a path of the data folder private")
            && text.contains(&data.join("wagate.redb").display().to_string()),
        "each tightening is logged with its path:\n{text}"
    );
    stop(&mut second).await;
}

/// With NATS and Redis, the data folder holds the ingress spool: private too.
#[tokio::test]
async fn the_ingress_spool_is_private() {
    let servers = Servers::start_in(Mode::Distributed).await;
    let data = servers.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    set_mode(&data, 0o750);
    let _w = Wagate::start(&servers, "http://127.0.0.1:1", &[]).await;
    assert_eq!(mode_of(&data), 0o700);
    assert_eq!(mode_of(&data.join("spool.redb")), 0o600);
}

/// Starts embedded wagate on the data folder of `servers`, which must be refused; its log.
async fn refused(servers: &Servers) -> String {
    match Wagate::try_start_role("serve", servers, "http://127.0.0.1:1", &[]).await {
        Ok(w) => panic!("wagate started:\n{}", w.logs()),
        Err(refused) => {
            assert!(!refused.status.success(), "{refused}");
            assert!(!refused.logs.contains("panicked"), "{refused}");
            refused.logs
        }
    }
}

fn database(servers: &Servers) -> PathBuf {
    servers.dir.path().join("data").join("wagate.redb")
}

#[tokio::test]
async fn an_empty_garbage_or_truncated_database_is_refused_naming_the_file() {
    let servers = Servers::start_in(Mode::Embedded).await;
    let file = database(&servers);
    let named = file.display().to_string();

    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"").unwrap();
    let logs = refused(&servers).await;
    assert!(
        logs.contains(&format!("{named} is empty (0 bytes)")),
        "{logs}"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "not made into a new, empty database"
    );

    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &garbage).unwrap();
    let logs = refused(&servers).await;
    assert!(logs.contains(&format!("{named} is damaged")), "{logs}");

    // A real database, cut short.
    std::fs::remove_file(&file).unwrap();
    let mut w = Wagate::start(&servers, "http://127.0.0.1:1", &[]).await;
    w.echo_agent("demo").await;
    assert!(w.terminate().await.0);
    let whole = std::fs::read(&file).unwrap();
    std::fs::write(&file, &whole[..whole.len() / 2]).unwrap();
    let logs = refused(&servers).await;
    assert!(logs.contains(&format!("{named} is damaged")), "{logs}");
}

#[tokio::test]
async fn a_flipped_bit_in_a_stored_record_is_refused_at_start() {
    let servers = Servers::start_in(Mode::Embedded).await;
    let twilio = FakeTwilio::start().await;
    twilio.add_account(ACCOUNT_SID, AUTH_TOKEN);
    let mut w = Wagate::start(&servers, &twilio.base_url, &[]).await;
    w.echo_agent("demo").await;
    let body = "a body to find in the file 7f3c9a";
    let r = w.inbound("demo", &sid(1), "+14155550100", body).await;
    assert_eq!(r.status(), 200);
    w.wait_until(Duration::from_secs(20), "the echo reply", || {
        twilio
            .sent()
            .iter()
            .any(|m| m.body.as_deref() == Some(body))
    })
    .await;
    assert!(w.terminate().await.0);

    // The body is in the session's turns (and may linger in freed pages, which no tree reads):
    // one bit flipped in the middle of every copy hits the live record.
    let file = database(&servers);
    let mut bytes = std::fs::read(&file).unwrap();
    let needle = body.as_bytes();
    let at: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter_map(|(i, w)| (w == needle).then_some(i))
        .collect();
    assert!(!at.is_empty(), "the body is stored in the file");
    for i in at {
        bytes[i + needle.len() / 2] ^= 0x04;
    }
    std::fs::write(&file, &bytes).unwrap();

    let logs = refused(&servers).await;
    assert!(
        logs.contains(&format!("{} is damaged", file.display())),
        "{logs}"
    );
}
