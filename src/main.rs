//! `wagate`: one binary, every role. `serve` runs ingress, worker and sender in one process;
//! `ingress`, `worker` and `sender` run one role each, as many processes as the load needs;
//! `dlq` lists and replays dead letters through the admin API.
//!
//! # Layout
//! - `roles`: connecting the bus and store and running the roles until shutdown.
//! - `http`: the listeners, with their timeouts, connection cap and bounded shutdown.
//! - `dlq`: the `wagate dlq` operator command.
//! - `chat`: `wagate chat`, a terminal dev phone for an agent in simulation mode.
//! - `first_start`: the secrets embedded mode creates in its data folder on first start.
//! - `telemetry`: logs (text or JSON) and OpenTelemetry traces.

mod chat;
mod dlq;
mod first_start;
mod health;
mod http;
mod listeners;
mod roles;
mod telemetry;

use std::{num::NonZeroUsize, process::ExitCode};

use clap::{Parser, Subcommand};
use shared::config::Settings;
use wagate_core::crypto::Keyring;

/// mimalloc instead of the system allocator: the hot paths allocate many small short-lived
/// buffers on several threads, where glibc's malloc spent ~15% of ingress CPU in its locks and
/// consolidation (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Puts AI agents on WhatsApp through Twilio.
#[derive(Parser)]
#[command(name = "wagate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs ingress, worker and sender in one process.
    Serve(Settings),
    /// Runs the webhook receiver and the admin API.
    Ingress(Settings),
    /// Runs agents on inbound messages (start as many as the load needs).
    Worker(Settings),
    /// Posts replies to Twilio (start as many as the load needs).
    Sender(Settings),
    /// Prints a new random master key for WAGATE_MASTER_KEY.
    Keygen,
    /// Lists and replays dead letters (through the admin API of a running wagate).
    Dlq(dlq::DlqArgs),
    /// Talks to an agent from the terminal as a WhatsApp user (simulation mode, no Twilio needed).
    Chat(chat::ChatArgs),
}

/// Which roles a process runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    ingress: bool,
    worker: bool,
    sender: bool,
}

impl Roles {
    /// Every role: `wagate serve`.
    const ALL: Roles = Roles {
        ingress: true,
        worker: true,
        sender: true,
    };

    /// Whether the worker and the sender run on runtimes of their own beside the main one:
    /// in one process with several roles, so that no role's burst queues the others.
    fn apart(self) -> bool {
        self.worker && self.sender
    }

    /// Threads of each of the process's runtimes: `WAGATE_THREADS`, or else the cores shared
    /// out among its runtimes, at least one each. `serve` on two cores then runs each role on
    /// one thread, which measured cheapest where the roles share the cores with NATS and Redis
    /// (docs/benchmarks.md, change 14).
    fn threads(self, setting: Option<NonZeroUsize>) -> NonZeroUsize {
        setting.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
            let runtimes = if self.apart() { 3 } else { 1 };
            NonZeroUsize::new(cores / runtimes).unwrap_or(NonZeroUsize::MIN)
        })
    }
}

fn main() -> ExitCode {
    small_pages();
    let cli = Cli::parse();
    let service = match cli.command {
        Command::Ingress(_) => "wagate-ingress",
        Command::Worker(_) => "wagate-worker",
        Command::Sender(_) => "wagate-sender",
        _ => "wagate",
    };
    // Declared before the runtime, so dropped after it: the last spans are sent once the
    // roles have stopped.
    let _telemetry = match telemetry::init(service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wagate: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (settings, roles) = match cli.command {
        Command::Keygen => {
            use secrecy::ExposeSecret;
            println!("{}", Keyring::generate_key().expose_secret());
            return ExitCode::SUCCESS;
        }
        Command::Dlq(args) => return dlq::main(args),
        Command::Chat(args) => return chat::main(args),
        Command::Serve(s) => (
            s,
            Roles {
                ingress: true,
                worker: true,
                sender: true,
            },
        ),
        Command::Ingress(s) => (
            s,
            Roles {
                ingress: true,
                worker: false,
                sender: false,
            },
        ),
        Command::Worker(s) => (
            s,
            Roles {
                ingress: false,
                worker: true,
                sender: false,
            },
        ),
        Command::Sender(s) => (
            s,
            Roles {
                ingress: false,
                worker: false,
                sender: true,
            },
        ),
    };
    raise_open_files_limit();
    let threads = roles.threads(settings.threads);
    let runtime = match runtime(threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wagate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(roles::run(settings, roles)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("wagate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for the process. mimalloc asks the kernel for them, and
/// then a 2 MiB page is zeroed and counted in full wherever a few bytes of it are touched: a
/// worker holding 10,000 slow agent calls took 614 MiB with them and 520 without, and a
/// `serve` under load 70 MiB against 46, at the same CPU per message (docs/benchmarks.md,
/// change 13). Called first, before the allocator has handed out much.
fn small_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!(
            "wagate: could not turn transparent huge pages off ({e}); memory use will be higher"
        );
    }
}

/// Raises the soft limit of open files to the hard limit, as Go's runtime does. Every
/// connection a listener holds takes a descriptor, and the soft limit a process often starts
/// with (1024 under systemd and most shells, kept low for select(2)'s sake, which wagate does
/// not use) is reached by a thousand slow clients: accept then fails, and even `/healthz` waits
/// in the backlog. The hard limit is what the operator allowed.
fn raise_open_files_limit() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let shown = |n: Option<u64>| n.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        let limit = getrlimit(Resource::Nofile);
        if limit.current == limit.maximum {
            tracing::debug!(limit = %shown(limit.current), "the open files limit is already at its hard limit");
            return;
        }
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!(
                from = %shown(limit.current),
                to = %shown(limit.maximum),
                "raised the open files limit to its hard limit"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                limit = %shown(limit.current),
                "could not raise the open files limit; the listeners hold at most about that many connections"
            ),
        }
    }
}

/// A runtime of `threads` threads: one runs its tasks on tokio's single-threaded scheduler,
/// with no hand-offs between threads.
fn runtime(threads: NonZeroUsize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads.get() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    }
    .enable_all()
    .build()
}

/// Runs an operator command (`chat`, `dlq`) to completion: exit status 0, or 1 with the error
/// on stderr as `wagate <name>: …`.
fn run_command(name: &str, command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wagate {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_ROLE: Roles = Roles {
        ingress: false,
        worker: true,
        sender: false,
    };

    #[test]
    fn the_setting_decides_the_threads_when_given() {
        let four = NonZeroUsize::new(4);
        assert_eq!(Roles::ALL.threads(four), NonZeroUsize::new(4).unwrap());
        assert_eq!(ONE_ROLE.threads(four), NonZeroUsize::new(4).unwrap());
    }

    #[test]
    fn unset_the_cores_are_shared_out_among_the_runtimes() {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(ONE_ROLE.threads(None).get(), cores);
        assert_eq!(Roles::ALL.threads(None).get(), (cores / 3).max(1));
    }
}
