//! The `oncegate` command: `run` (default), `check` and `demo` (SPEC §10).
//! Bad config, unreadable files and busy ports end with one line on stderr and exit code 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use oncegate::config::Config;

/// mimalloc: with 64 requests in flight glibc's per-thread cache (7 chunks per size) missed on
/// most sizes, and its slow path took ~10 % of a download's instructions (docs/BENCHMARKS.md).
/// Built without asking for transparent huge pages (`no_thp`; see also `refuse_huge_pages`).
/// Set here, not in the library, so the fuzz targets keep the system allocator their sanitizer
/// watches; the measuring examples set the same.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps the process off transparent huge pages, whatever the host's mode: each would make 2 MiB
/// resident at a time, and with them eight 20 MiB downloads came to the 64 MiB that SPEC §3
/// allows (with the allocator asking for them, or with the host's mode `always`).
fn refuse_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "oncegate: cannot turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[derive(Parser)]
#[command(
    name = "oncegate",
    version,
    about = "A reverse proxy that lets each asset package be downloaded exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The config file (for `run`, the default subcommand).
    #[arg(long, global = true, default_value = "config/oncegate.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file and exit 0, or print every problem and exit 2.
    Check,
    /// Start a demo upstream and the proxy in front of it on loopback, and print commands to try.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where the demo proxy's admin listener listens.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
    },
}

const CONFIG_ERROR: u8 = 2;

fn main() -> ExitCode {
    refuse_huge_pages();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Run => match Config::load(&cli.config) {
            Ok(config) => run(config, None, Some(&cli.config)),
            Err(errors) => fail(&format!("{}: {errors}", cli.config.display())),
        },
        Command::Demo { listen, admin } => match oncegate::demo::demo_config(listen, admin) {
            Ok(config) => run(config, Some(listen), None),
            Err(e) => fail(&e),
        },
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let problems = match Config::load(path) {
        Ok(config) => oncegate::check_resources(&config).err().unwrap_or_default(),
        Err(errors) => errors.0,
    };
    if problems.is_empty() {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    for problem in &problems {
        eprintln!("{}: {problem}", path.display());
    }
    ExitCode::from(CONFIG_ERROR)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("oncegate: {}", message.replace('\n', " "));
    ExitCode::from(CONFIG_ERROR)
}

/// Runs until SIGTERM / SIGINT; on SIGHUP re-reads `config_path` (the demo has none).
fn run(
    config: Config,
    demo: Option<std::net::SocketAddr>,
    config_path: Option<&std::path::Path>,
) -> ExitCode {
    oncegate::telemetry::init_logging(&config.log);
    let runtime = match runtime_builder().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        let mut signals = Signals::install();
        let demo_upstream = match demo {
            Some(_) => match oncegate::demo::start_upstream().await {
                Ok(upstream) => Some(upstream),
                Err(e) => return fail(&e),
            },
            None => None,
        };
        let mut config = config;
        if let Some(upstream) = &demo_upstream {
            config.upstream = upstream.upstream_config();
        }
        let running = match oncegate::start(config).await {
            Ok(running) => running,
            Err(e) => return fail(&e),
        };
        if let Some(upstream) = &demo_upstream {
            // A closed stdout (piped into `head`, say) must not stop the demo.
            let text = oncegate::demo::instructions(running.addr, running.admin_addr, upstream);
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
        }
        while signals.recv().await == Signal::Reload {
            match config_path {
                // The outcome is logged (and counted) where it is decided.
                Some(path) => drop(running.reload_from(path)),
                None => tracing::info!("SIGHUP ignored: the demo has no config file to re-read"),
            }
        }
        tracing::info!("shutting down");
        running.shutdown();
        running.wait().await;
        ExitCode::SUCCESS
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Stop,
    Reload,
}

/// One worker (`TOKIO_WORKER_THREADS=1`, or a single CPU) gets the current-thread scheduler:
/// the work-stealing one would only add cross-thread bookkeeping to every task wake-up.
fn runtime_builder() -> tokio::runtime::Builder {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

/// SIGTERM and SIGINT (stop) and SIGHUP (reload), listened for from before the proxy starts so
/// an early signal is neither lost nor fatal.
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            terminate: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
            hangup: signal(SignalKind::hangup()).ok(),
        }
    }

    async fn recv(&mut self) -> Signal {
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(&mut self.terminate) => Signal::Stop,
            () = next(&mut self.interrupt) => Signal::Stop,
            () = next(&mut self.hangup) => Signal::Reload,
        }
    }
}
