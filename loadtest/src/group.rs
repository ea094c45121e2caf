//! A group of client connections: in this process on its own threads (one
//! current-thread runtime each, so counting needs no locks), or in a worker process
//! (`loadtest worker`) driven over its stdin/stdout when one process cannot hold them all.

use std::cell::{Cell, RefCell};
use std::process::Stdio;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::{self, Plan};
use crate::scenario::Scenario;
use crate::stats::Stats;

/// Which connections a group owns: indices `start..end` of the scenario's connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Share {
    pub scenario: Scenario,
    pub start: usize,
    pub end: usize,
}

impl Share {
    fn ramp(&self) -> f64 {
        let n = self.scenario.connections.max(1) as f64;
        self.scenario.ramp * (self.end - self.start) as f64 / n
    }
}

enum Control {
    /// Answered once every connection of the thread has opened or failed.
    Opened(oneshot::Sender<Stats>),
    /// Counts since the last snapshot.
    Snapshot(oneshot::Sender<Stats>),
    /// Closes every connection, then answers.
    Stop(oneshot::Sender<Stats>),
}

/// Connections on threads of this process.
pub struct Local {
    threads: Vec<(mpsc::UnboundedSender<Control>, std::thread::JoinHandle<()>)>,
}

impl Local {
    pub fn start(share: &Share) -> anyhow::Result<Self> {
        let n = share.scenario.client_threads.max(1);
        let mut threads = Vec::new();
        for t in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let conns: Vec<usize> = (share.start..share.end).skip(t).step_by(n).collect();
            let scenario = share.scenario.clone();
            let ramp = share.ramp() / n as f64;
            let join = std::thread::Builder::new()
                .name(format!("clients-{t}"))
                .spawn(move || thread_main(scenario, conns, ramp, rx))
                .context("client thread")?;
            threads.push((tx, join));
        }
        Ok(Self { threads })
    }

    async fn ask(&self, make: fn(oneshot::Sender<Stats>) -> Control) -> anyhow::Result<Stats> {
        let mut waits = Vec::new();
        for (tx, _) in &self.threads {
            let (otx, orx) = oneshot::channel();
            tx.send(make(otx))
                .map_err(|_| anyhow!("client thread gone"))?;
            waits.push(orx);
        }
        let mut total = Stats::default();
        for w in waits {
            total.merge(&w.await.map_err(|_| anyhow!("client thread gone"))?);
        }
        Ok(total)
    }

    pub async fn opened(&self) -> anyhow::Result<Stats> {
        self.ask(Control::Opened).await
    }

    pub async fn snapshot(&self) -> anyhow::Result<Stats> {
        self.ask(Control::Snapshot).await
    }

    pub async fn stop(self) -> anyhow::Result<Stats> {
        let stats = self.ask(Control::Stop).await;
        for (tx, join) in self.threads {
            drop(tx);
            let _ = tokio::task::spawn_blocking(move || join.join()).await;
        }
        stats
    }
}

fn thread_main(
    scenario: Scenario,
    conns: Vec<usize>,
    ramp: f64,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let stats = Rc::new(RefCell::new(Stats::default()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let total = conns.len();
        let (done_tx, done_rx) = watch::channel(0usize);
        let done = Rc::new(Cell::new(0usize));
        let opened: Rc<dyn Fn()> = {
            let done = done.clone();
            Rc::new(move || {
                done.set(done.get() + 1);
                let _ = done_tx.send(done.get());
            })
        };
        let mut tasks = tokio::task::JoinSet::new();
        {
            let stats = stats.clone();
            let stop = stop_rx.clone();
            tokio::task::spawn_local(async move {
                let start = Instant::now();
                for (k, conn) in conns.into_iter().enumerate() {
                    if ramp > 0.0 {
                        let at = start + Duration::from_secs_f64(k as f64 / ramp);
                        if at > Instant::now() + Duration::from_millis(1) {
                            tokio::time::sleep_until(at.into()).await;
                        }
                    }
                    if *stop.borrow() {
                        return;
                    }
                    let plan = plan(&scenario, conn);
                    tokio::task::spawn_local(client::run(
                        plan,
                        stats.clone(),
                        stop.clone(),
                        opened.clone(),
                    ));
                }
            });
        }
        while let Some(cmd) = control.recv().await {
            match cmd {
                Control::Opened(reply) => {
                    let mut done_rx = done_rx.clone();
                    let stats = stats.clone();
                    tasks.spawn_local(async move {
                        let _ = done_rx.wait_for(|&n| n >= total).await;
                        let _ = reply.send(stats.borrow_mut().take_step());
                    });
                }
                Control::Snapshot(reply) => {
                    let _ = reply.send(stats.borrow_mut().take_step());
                }
                Control::Stop(reply) => {
                    let _ = stop_tx.send(true);
                    // Let the clients send their close frames.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = reply.send(stats.borrow_mut().take_step());
                    return;
                }
            }
        }
    });
}

fn plan(s: &Scenario, conn: usize) -> Plan {
    let channel_ids = s.subscriptions(conn);
    Plan {
        url: s.urls[conn % s.urls.len()].clone(),
        source: s.source_addr(conn),
        channels: channel_ids.iter().map(|&c| s.channel_name(c)).collect(),
        channel_ids,
        timeout: s.connect_timeout,
        protocol: s.protocol,
        run: s.run,
    }
}

/// Connections in a worker process (`loadtest worker`): one JSON line in (the share),
/// then commands `opened`, `snapshot`, `stop`, each answered with one JSON line of stats.
pub struct Remote {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Remote {
    pub async fn start(share: &Share) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("worker stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker stdout"))?;
        let mut line = serde_json::to_string(share)?;
        line.push('\n');
        stdin.write_all(line.as_bytes()).await?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn ask(&mut self, command: &str) -> anyhow::Result<Stats> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        let line = self
            .lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow!("worker exited"))?;
        serde_json::from_str(&line).context("worker reply")
    }

    pub async fn opened(&mut self) -> anyhow::Result<Stats> {
        self.ask("opened").await
    }

    pub async fn snapshot(&mut self) -> anyhow::Result<Stats> {
        self.ask("snapshot").await
    }

    pub async fn stop(mut self) -> anyhow::Result<Stats> {
        let stats = self.ask("stop").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        stats
    }
}

/// The worker side of [`Remote`].
pub async fn worker_main() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("no share on stdin"))?;
    let share: Share = serde_json::from_str(&first)?;
    let group = Local::start(&share)?;
    let mut out = tokio::io::stdout();
    let mut group = Some(group);
    while let Some(cmd) = lines.next_line().await? {
        let Some(g) = group.as_ref() else { break };
        let stats = match cmd.as_str() {
            "opened" => g.opened().await?,
            "snapshot" => g.snapshot().await?,
            "stop" => {
                group
                    .take()
                    .ok_or_else(|| anyhow!("stopped"))?
                    .stop()
                    .await?
            }
            other => anyhow::bail!("unknown worker command {other}"),
        };
        let mut line = serde_json::to_string(&stats)?;
        line.push('\n');
        out.write_all(line.as_bytes()).await?;
        out.flush().await?;
    }
    if let Some(g) = group {
        g.stop().await?;
    }
    Ok(())
}

/// Either kind of group.
pub enum Group {
    Local(Local),
    Remote(Box<Remote>),
}

impl Group {
    pub async fn opened(&mut self) -> anyhow::Result<Stats> {
        match self {
            Group::Local(g) => g.opened().await,
            Group::Remote(g) => g.opened().await,
        }
    }

    pub async fn snapshot(&mut self) -> anyhow::Result<Stats> {
        match self {
            Group::Local(g) => g.snapshot().await,
            Group::Remote(g) => g.snapshot().await,
        }
    }

    pub async fn stop(self) -> anyhow::Result<Stats> {
        match self {
            Group::Local(g) => g.stop().await,
            Group::Remote(g) => g.stop().await,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Group::Local(_) => None,
            Group::Remote(g) => g.pid(),
        }
    }
}
