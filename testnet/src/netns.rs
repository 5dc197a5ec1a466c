//! `--mode netns`: every process of a federated run in its own Linux network namespace, joined
//! by veth pairs to a bridge that lives in a hub namespace of its own (the host's interfaces
//! are never touched). Needs root and iproute2. Everything is removed when the [`Netns`] is
//! dropped, so a failed run leaves no namespaces behind.
//!
//! Addresses: the bootstrap node at 10.77.0.2, node `i` at 10.77.0.(10 + i), on 10.77.0.0/24.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

static RUNS: AtomicU32 = AtomicU32::new(0);

/// The namespaces of one run.
pub struct Netns {
    hub: String,
    members: Vec<String>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (iproute2 is needed for --mode netns)")?;
    anyhow::ensure!(
        output.status.success(),
        "`ip {}` failed: {} (--mode netns needs root and network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// Creates the hub with its bridge, one namespace for the bootstrap node and one per node.
    pub fn create(nodes: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            nodes <= 200,
            "--mode netns supports up to 200 nodes (one /24)"
        );
        let tag = format!(
            "mt{}x{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{tag}-hub");
        ip(&["netns", "add", &hub])?;
        let mut netns = Netns {
            hub,
            members: Vec::new(),
        };
        let hub = netns.hub.clone();
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for k in 0..=nodes {
            let name = if k == 0 {
                format!("{tag}-boot")
            } else {
                format!("{tag}-n{}", k - 1)
            };
            ip(&["netns", "add", &name])?;
            netns.members.push(name.clone());
            let veth = format!("v{k}");
            ip(&[
                "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &name,
            ])?;
            ip(&["-n", &hub, "link", "set", &veth, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &veth, "up"])?;
            let addr = format!("{}/24", Self::address(k));
            ip(&["-n", &name, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &name, "link", "set", "eth0", "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        tracing::info!(hub = %netns.hub, namespaces = netns.members.len(), "network namespaces ready");
        Ok(netns)
    }

    fn address(k: usize) -> String {
        if k == 0 {
            "10.77.0.2".into()
        } else {
            format!("10.77.0.{}", 9 + k)
        }
    }

    /// The bootstrap node's IP.
    pub fn bootstrap_ip(&self) -> String {
        Self::address(0)
    }

    /// Node `i`'s IP.
    pub fn node_ip(&self, i: usize) -> String {
        Self::address(i + 1)
    }

    /// `program` run inside the bootstrap namespace (`None`) or node `i`'s.
    pub fn command(&self, node: Option<usize>, program: &Path) -> Command {
        let ns = &self.members[node.map_or(0, |i| i + 1)];
        let mut cmd = Command::new("ip");
        cmd.args([OsStr::new("netns"), OsStr::new("exec"), OsStr::new(ns)]);
        cmd.arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.members.iter().chain(std::iter::once(&self.hub)) {
            if let Err(err) = ip(&["netns", "del", name]) {
                tracing::warn!(namespace = %name, error = %format!("{err:#}"), "could not remove a network namespace");
            }
        }
    }
}
