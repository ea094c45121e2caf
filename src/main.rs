//! The `pgfanout` binary: parse config, install logging and metrics, turn signals into a
//! cancellation, run the node.

use clap::Parser;
use tokio_util::sync::CancellationToken;

use pgfanout::config::{Command, Config, LogFormat};

/// Exit status after a second signal cut the drain short (128 + SIGINT, as shells do).
const SECOND_SIGNAL_EXIT: i32 = 130;
/// How long the runtime waits for tasks after `run` returned (within the shutdown grace,
/// `run` has already stopped everything it owns).
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(500);

fn main() -> std::process::ExitCode {
    let config = match Config::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgfanout: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pgfanout: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(Command::Migrate) = config.command {
        return runtime.block_on(migrate(&config));
    }
    let result = runtime.block_on(serve(config));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pgfanout failed");
            eprintln!("pgfanout: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `pgfanout migrate`: applies the schema once and reports what it did.
async fn migrate(config: &Config) -> std::process::ExitCode {
    let Some(url) = &config.database_url else {
        eprintln!("pgfanout migrate: PGFANOUT_DATABASE_URL is not set");
        return std::process::ExitCode::from(2);
    };
    match pgfanout::ingest::migrate::migrate(url, config.outbox_max_event_bytes).await {
        Ok(m) if m.from == m.to => {
            println!("pgfanout schema already at version {}", m.to);
            std::process::ExitCode::SUCCESS
        }
        Ok(m) => {
            println!(
                "pgfanout schema migrated from version {} to {}",
                m.from, m.to
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgfanout migrate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let metrics = pgfanout::metrics::install(config.node_id(), shutdown.clone())?;
    // The first SIGTERM or SIGINT starts the drain; a second one exits at once.
    let signals = shutdown.clone();
    tokio::spawn(async move {
        pgfanout::shutdown::watch_signals(signals).await;
        std::process::exit(SECOND_SIGNAL_EXIT);
    });
    pgfanout::run(config, shutdown, Some(metrics)).await?;
    Ok(())
}

fn init_tracing(config: &Config) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // A dead log pipe must not panic the task that logs (it could be the signal watcher).
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
