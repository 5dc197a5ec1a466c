//! `meshtune-bootstrap`: parses flags, sets up logging, runs the node until Ctrl-C or
//! SIGTERM. Listen addresses go to stdout, one per line; logs go to stderr.

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use meshtune_bootstrap::{
    Event,
    config::{Cli, LogFormat},
};
use tracing_subscriber::EnvFilter;

/// How long shutdown may take before the process exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (config, log_format) = Cli::parse().resolve()?;
    init_logging(log_format);

    let mut node = meshtune_bootstrap::start(&config).await?;
    let mut terminate = terminate_signal()?;
    loop {
        tokio::select! {
            event = node.next_event() => match event {
                Some(Event::Listening { address }) => print_line(&address.to_string()),
                Some(_) => {}
                None => anyhow::bail!("the network task stopped unexpectedly"),
            },
            result = tokio::signal::ctrl_c() => {
                result.context("cannot listen for Ctrl-C")?;
                tracing::info!("Ctrl-C: shutting down");
                break;
            }
            () = terminate.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break;
            }
        }
    }
    node.shutdown(SHUTDOWN_DEADLINE).await?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Stdout carries only addresses, flushed at once so a reader sees each line immediately.
fn print_line(line: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        tracing::warn!(%error, "cannot write address to stdout");
    }
}

#[cfg(unix)]
struct Terminate(tokio::signal::unix::Signal);

#[cfg(unix)]
fn terminate_signal() -> anyhow::Result<Terminate> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok(Terminate(
        signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
    ))
}

#[cfg(unix)]
impl Terminate {
    async fn recv(&mut self) {
        if self.0.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(not(unix))]
struct Terminate;

#[cfg(not(unix))]
fn terminate_signal() -> anyhow::Result<Terminate> {
    Ok(Terminate)
}

#[cfg(not(unix))]
impl Terminate {
    async fn recv(&mut self) {
        std::future::pending::<()>().await
    }
}
