//! [`KeepAlive`]: one HTTP/1.1 connection kept open across requests, so a test can keep
//! asking a node that no longer accepts new connections (e.g. `/ready` while it drains).

use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(5);

pub struct KeepAlive {
    stream: BufReader<TcpStream>,
}

impl KeepAlive {
    /// Connects to 127.0.0.1:`port`.
    pub async fn open(port: u16) -> anyhow::Result<KeepAlive> {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .context("connect timed out")??;
        Ok(KeepAlive {
            stream: BufReader::new(stream),
        })
    }

    /// `GET path` on this connection: status and body (the body needs a Content-Length).
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, String)> {
        tokio::time::timeout(TIMEOUT, self.exchange(path))
            .await
            .with_context(|| format!("GET {path} timed out"))?
    }

    async fn exchange(&mut self, path: &str) -> anyhow::Result<(u16, String)> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status_line = String::new();
        if self.stream.read_line(&mut status_line).await? == 0 {
            bail!("connection closed by the server");
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut length = None;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let length = length.context("response without Content-Length")?;
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
