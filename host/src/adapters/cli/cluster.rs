//! `edgeproxy cluster …`: credentials for the fleet, and what a running POP sees of it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};

use super::output::{emit, render};
use crate::adapters::cluster::tls;
use crate::domain::ports::ClusterStatus;

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Make the cluster CA (ca.pem, ca.key) that every POP's certificate is signed by.
    /// Keep ca.key off the POPs.
    Ca {
        /// Directory to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The cluster's name, recorded in the CA's subject.
        #[arg(long, default_value = "edgeproxy")]
        name: String,
    },
    /// Make a POP's certificate and key (NODE.pem, NODE.key), signed by the cluster CA.
    Cert {
        node: String,
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        /// Directory to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The cluster the certificate is for (peers check it); default: the one the CA
        /// was made for.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// This POP's view of the fleet, from its admin API: members, sync, table digest.
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    command: ClusterCommand,
    admin: Option<(SocketAddr, Option<String>)>,
) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Ca { dir, name } => {
            let (cert, key) = tls::make_ca(&dir, &name)?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(())
        }
        ClusterCommand::Cert {
            node,
            ca_dir,
            dir,
            cluster,
        } => {
            let cluster = match cluster {
                Some(c) => c,
                None => tls::ca_cluster(&ca_dir)?,
            };
            let (cert, key) = tls::make_node_cert(&ca_dir, &dir, &node, &cluster)?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(())
        }
        ClusterCommand::Status { json } => {
            let (addr, token) =
                admin.context("the admin API is off (admin_addr); cluster status reads it")?;
            let status: ClusterStatus =
                serde_json::from_slice(&get(addr, "/cluster", token).await?)
                    .context("the admin API's /cluster answer")?;
            emit(json, &status, || render_status(&status))
        }
    }
}

/// One GET to the local admin API.
pub async fn get(addr: SocketAddr, path: &str, token: Option<String>) -> anyhow::Result<Vec<u8>> {
    request(addr, hyper::Method::GET, path, token).await
}

/// One request without a body to the local admin API; the body of a 2xx answer.
pub async fn request(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    token: Option<String>,
) -> anyhow::Result<Vec<u8>> {
    request_with(addr, method, path, token, Vec::new()).await
}

/// One request with `body` to the local admin API; the body of a 2xx answer.
pub async fn request_with(
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    token: Option<String>,
    body: Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("connecting to the admin API at {addr} (is edgeproxy running?)")
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(bytes::Bytes::from(body)))?)
        .await?;
    let code = resp.status();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    if !code.is_success() {
        anyhow::bail!("{path}: {code}: {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(body)
}

pub fn render_status(s: &ClusterStatus) -> String {
    let ago = |v: Option<f64>| v.map_or("never".to_owned(), |s| format!("{s:.1}s ago"));
    let mut out = format!(
        "node      {} ({})\ngossip    {}\ntransport {}\nrows      {} live, {} tombstones\ndigest    {}\nlast sync {}\nchanges   sent {}, received {}, applied {}, rejected {}, clock ahead {}, superseded {}\nsync      {} rounds, {} failed; {} B in, {} B out; {} peers refused, {} stream errors\n\n",
        s.name,
        s.node,
        s.gossip,
        s.transport,
        s.rows,
        s.tombstones,
        s.digest,
        ago(s.last_sync_secs_ago),
        s.changes_sent,
        s.changes_received,
        s.changes_applied,
        s.changes_rejected,
        s.changes_clock_ahead,
        s.changes_superseded,
        s.sync_rounds,
        s.sync_failures,
        s.bytes_in,
        s.bytes_out,
        s.peers_refused,
        s.stream_errors,
    );
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.node.clone(),
                m.state.clone(),
                m.gossip.to_string(),
                m.transport.to_string(),
                ago(m.last_sync_secs_ago),
            ]
        })
        .collect();
    out += &render(
        &[
            "member",
            "node",
            "state",
            "gossip",
            "transport",
            "last sync",
        ],
        &rows,
    );
    if !s.policies.is_empty() || !s.deployments.is_empty() {
        out += "\n";
        out += &render_policies(s);
    }
    out
}

/// What each POP runs, and the deployments standing.
fn render_policies(s: &ClusterStatus) -> String {
    use crate::domain::rollout::Running;
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let cell = |r: &Option<Running>| match r {
        None => "-".to_owned(),
        Some(r) => format!(
            "{} {} ({}) since {}, {} faults",
            r.name,
            short(&r.hash),
            r.deployment
                .as_deref()
                .map_or("configured".to_owned(), |d| format!("deployment {d}")),
            r.since,
            r.faults
        ),
    };
    let rows: Vec<Vec<String>> = s
        .policies
        .iter()
        .map(|p| {
            vec![
                p.pop.clone(),
                p.region.clone(),
                cell(&p.live),
                cell(&p.shadow),
                p.refused.first().map_or("-".to_owned(), |r| {
                    format!("refused {} ({}): {}", r.deployment, short(&r.hash), r.cause)
                }),
            ]
        })
        .collect();
    let mut out = render(
        &[
            "pop",
            "region",
            "live policy",
            "shadow policy",
            "last refusal",
        ],
        &rows,
    );
    let standing: Vec<Vec<String>> = s
        .deployments
        .iter()
        .rev()
        .map(|d| {
            vec![
                d.id.clone(),
                d.role.to_string(),
                d.name.clone(),
                short(&d.hash),
                d.targets.to_string(),
                d.by.clone(),
                if d.revoked { "rolled back" } else { "standing" }.to_owned(),
            ]
        })
        .collect();
    if !standing.is_empty() {
        out += "\n";
        out += &render(
            &[
                "deployment",
                "role",
                "component",
                "hash",
                "for",
                "by",
                "state",
            ],
            &standing,
        );
    }
    out
}
