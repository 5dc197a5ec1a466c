//! `--mode docker`: the bootstrap and every node as containers of the FROM-scratch image
//! (`docker/build.sh` builds `meshtune:cpu`), each with its own address on a private compose
//! network. The run directory is bind-mounted at the same path, so nodes read their shards and
//! write `rounds.jsonl` and checkpoints exactly where the process mode does. Containers are
//! named `<project>-<service>`; everything is taken down (logs saved first) when the
//! [`DockerMesh`] is dropped.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

static RUNS: AtomicU32 = AtomicU32::new(0);

/// The image `--mode docker` runs.
pub const IMAGE: &str = "meshtune:cpu";

struct Service {
    ip: String,
    entrypoint: String,
    args: Vec<String>,
}

/// One compose project: its file, its network and the services started so far.
pub struct DockerMesh {
    project: String,
    compose: Vec<String>,
    file: PathBuf,
    mount: PathBuf,
    logs: PathBuf,
    subnet: String,
    services: RefCell<BTreeMap<String, Service>>,
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl DockerMesh {
    /// Checks the engine, compose and the image; `mount` is the run's root directory (shared
    /// with the containers at the same path), `logs` where container logs go.
    pub fn create(mount: &Path, logs: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            mount.is_absolute(),
            "internal: the docker mount must be absolute"
        );
        run(
            Command::new("docker").args(["image", "inspect", IMAGE]),
            "`docker image inspect meshtune:cpu`",
        )
        .context("--mode docker needs a Docker engine and the meshtune:cpu image: run docker/build.sh first")?;
        let compose: Vec<String> = if Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            vec!["docker".into(), "compose".into()]
        } else if Command::new("docker-compose")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            vec!["docker-compose".into()]
        } else {
            anyhow::bail!("--mode docker needs docker compose (the plugin or docker-compose v1)");
        };
        let k = RUNS.fetch_add(1, Ordering::Relaxed);
        let project = format!("mtnet{}x{k}", std::process::id());
        let octet = 20 + (std::process::id() + k) % 200;
        std::fs::create_dir_all(logs)?;
        Ok(Self {
            file: logs.join("compose.yml"),
            project,
            compose,
            mount: mount.to_path_buf(),
            logs: logs.to_path_buf(),
            subnet: format!("172.30.{octet}"),
            services: RefCell::new(BTreeMap::new()),
        })
    }

    pub fn bootstrap_ip(&self) -> String {
        format!("{}.2", self.subnet)
    }

    pub fn node_ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    fn container(&self, service: &str) -> String {
        format!("{}-{service}", self.project)
    }

    fn write_file(&self) -> anyhow::Result<()> {
        let mount = self.mount.display().to_string();
        let mut yml = String::from("# written by meshtune-testnet --mode docker\nservices:\n");
        for (name, s) in self.services.borrow().iter() {
            let args: Vec<String> = s
                .args
                .iter()
                .map(|a| serde_json::to_string(a).unwrap_or_default())
                .collect();
            yml.push_str(&format!(
                "  {name}:\n    image: {IMAGE}\n    container_name: {}\n    restart: \"no\"\n    \
                 entrypoint: [{}]\n    command: [{}]\n    environment: {{ MESHTUNE_LOG_FORMAT: json }}\n    \
                 volumes: [{}]\n    networks:\n      mesh: {{ ipv4_address: {} }}\n",
                self.container(name),
                serde_json::to_string(&s.entrypoint)?,
                args.join(", "),
                serde_json::to_string(&format!("{mount}:{mount}"))?,
                s.ip
            ));
        }
        yml.push_str(&format!(
            "networks:\n  mesh:\n    driver: bridge\n    ipam:\n      config: [{{ subnet: {}.0/24 }}]\n",
            self.subnet
        ));
        std::fs::write(&self.file, yml).with_context(|| format!("writing {}", self.file.display()))
    }

    fn compose(&self) -> Command {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(&self.file);
        cmd
    }

    /// Defines (or redefines) `service` and starts it.
    pub fn start(
        &self,
        service: &str,
        ip: String,
        entrypoint: &str,
        args: Vec<String>,
    ) -> anyhow::Result<()> {
        self.services.borrow_mut().insert(
            service.to_owned(),
            Service {
                ip,
                entrypoint: entrypoint.to_owned(),
                args,
            },
        );
        self.write_file()?;
        run(
            self.compose()
                .args(["up", "-d", "--no-deps", "--force-recreate", service]),
            &format!("compose up {service}"),
        )?;
        Ok(())
    }

    /// SIGKILLs a service's container.
    pub fn kill(&self, service: &str) -> anyhow::Result<()> {
        run(
            Command::new("docker").args(["kill", &self.container(service)]),
            &format!("docker kill {service}"),
        )?;
        Ok(())
    }

    /// `None` while running; `Some(exit code)` once it stopped.
    pub fn status(&self, service: &str) -> anyhow::Result<Option<i64>> {
        let out = run(
            Command::new("docker").args([
                "inspect",
                "-f",
                "{{.State.Running}} {{.State.ExitCode}}",
                &self.container(service),
            ]),
            &format!("docker inspect {service}"),
        )?;
        let mut parts = out.split_whitespace();
        match (parts.next(), parts.next().and_then(|c| c.parse().ok())) {
            (Some("true"), _) => Ok(None),
            (Some("false"), Some(code)) => Ok(Some(code)),
            _ => anyhow::bail!("unexpected `docker inspect` output for {service}: {out}"),
        }
    }
}

impl Drop for DockerMesh {
    fn drop(&mut self) {
        for name in self.services.borrow().keys() {
            if let Ok(output) = Command::new("docker")
                .args(["logs", &self.container(name)])
                .output()
            {
                let mut log = output.stdout;
                log.extend_from_slice(&output.stderr);
                let _ = std::fs::write(self.logs.join(format!("{name}.log")), log);
            }
        }
        if let Err(err) = run(
            self.compose().args(["down", "--timeout", "1"]),
            "compose down",
        ) {
            tracing::warn!(project = %self.project, error = %format!("{err:#}"), "could not take the docker testnet down");
        }
    }
}
