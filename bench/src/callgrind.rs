//! Instructions counted by callgrind: P5's cost in a measure that does not depend on the
//! machine's speed that day. CPU seconds per reply doubled between two days for the same build
//! (docs/benchmarks.md), and this machine has no hardware counters, but valgrind counts the
//! instructions a process executes, the same for the same work whatever else runs beside it.
//!
//! A process runs under `valgrind --tool=callgrind`; `callgrind_control` zeroes its counters
//! before a measured run and dumps them after it, so start-up and warm-up are not counted.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Whether valgrind and callgrind_control can be run here.
pub fn available() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|program| {
        Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The command that runs a process under callgrind, writing its counts into `dir`.
pub fn wrapper(dir: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}", out_file(dir, "%p").display()),
    ]
}

fn out_file(dir: &Path, pid: &str) -> PathBuf {
    dir.join(format!("callgrind.out.{pid}"))
}

/// Sets the counters of process `pid` to zero.
pub fn zero(pid: u32) -> Result<()> {
    control(pid, "--zero")
}

/// Dumps the counters of process `pid` (which ran with [`wrapper`]`(dir)`) and returns the
/// instructions it executed since they were last zeroed. The dump stays in `dir`, for
/// `callgrind_annotate`.
pub fn dump(pid: u32, dir: &Path) -> Result<u64> {
    control(pid, "--dump")?;
    let prefix = format!("callgrind.out.{pid}.");
    let newest = std::fs::read_dir(dir)?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let part: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((part, name))
        })
        .max()
        .context("callgrind wrote no dump")?;
    let path = dir.join(newest.1);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no instruction summary in {}", path.display()))
}

fn control(pid: u32, command: &str) -> Result<()> {
    let out = Command::new("callgrind_control")
        .arg(command)
        .arg(pid.to_string())
        .output()
        .context("cannot run callgrind_control")?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.contains("OK") {
        bail!(
            "callgrind_control {command} {pid} failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
