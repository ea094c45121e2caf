//! The live-table demo (`PGFANOUT_DEMO=true`; off by default, never for production): the page
//! in `examples/live-table/`, embedded in the binary and served at `/demo/`, and the tiny API
//! it uses to change the demo table, whose trigger notifies [`CHANNEL`].
//!
//! The node creates the table, its trigger and the channel subscription itself (idempotent;
//! several nodes may start at once). With `PGFANOUT_TOKEN_HMAC_SECRET_KEY` set, the page gets
//! short connection tokens for the demo channel from [`token`] (and the SDK refreshes them);
//! without it, it connects anonymously. Every API request opens its own short Postgres
//! connection, at most [`MAX_CONCURRENT`] at a time per node: demo traffic is a person
//! clicking, and nothing a client does can hold connections open.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// The Postgres channel the demo table's trigger notifies (added to `PGFANOUT_CHANNELS`).
pub const CHANNEL: &str = "pgfanout_demo";
/// The demo table, in the `public` schema of `PGFANOUT_DATABASE_URL`'s database.
pub const TABLE: &str = "pgfanout_demo";
/// API requests talking to Postgres at once on one node; more get 503.
pub const MAX_CONCURRENT: usize = 4;
/// Rows one insert request may add.
pub const MAX_INSERT: i32 = 500;
/// Rows the snapshot returns (the newest); the page shows as many.
pub const SNAPSHOT_ROWS: i64 = 1000;
/// Characters of a row label.
pub const MAX_LABEL: usize = 100;
/// Lifetime of the connection tokens the page gets; the SDK fetches a new one before it ends.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

const MAX_BODY: usize = 4 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const APPLICATION_NAME: &str = "pgfanout-demo";

/// The table, its triggers and the notification, created or replaced in one transaction under
/// an advisory lock, so that nodes starting together do not trip over each other. A row event
/// is `{"op": "INSERT"|"UPDATE"|"DELETE", "row": {...}}`; the label's CHECK keeps it far below
/// NOTIFY's 8000-byte limit.
const SETUP_SQL: &str = r#"
BEGIN;
SET LOCAL client_min_messages = warning;
SELECT pg_advisory_xact_lock(7345016628102939153);
CREATE TABLE IF NOT EXISTS public.pgfanout_demo (
    id bigserial PRIMARY KEY,
    label text NOT NULL CHECK (char_length(label) BETWEEN 1 AND 200),
    value integer NOT NULL DEFAULT 0,
    version integer NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION public.pgfanout_demo_touch() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION public.pgfanout_demo_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('pgfanout_demo', json_build_object('op', TG_OP, 'row', row_to_json(OLD))::text);
    ELSE
        PERFORM pg_notify('pgfanout_demo', json_build_object('op', TG_OP, 'row', row_to_json(NEW))::text);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS pgfanout_demo_touch ON public.pgfanout_demo;
CREATE TRIGGER pgfanout_demo_touch BEFORE UPDATE ON public.pgfanout_demo
    FOR EACH ROW EXECUTE FUNCTION public.pgfanout_demo_touch();
DROP TRIGGER IF EXISTS pgfanout_demo_notify ON public.pgfanout_demo;
CREATE TRIGGER pgfanout_demo_notify AFTER INSERT OR UPDATE OR DELETE ON public.pgfanout_demo
    FOR EACH ROW EXECUTE FUNCTION public.pgfanout_demo_notify();
COMMIT;
"#;

/// The page's files: path under `/demo/`, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("../examples/live-table/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../examples/live-table/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../examples/live-table/style.css"),
    ),
    (
        "vendor/centrifuge.js",
        "text/javascript; charset=utf-8",
        include_str!("../examples/live-table/vendor/centrifuge.js"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("invalid PGFANOUT_DATABASE_URL: {0}")]
    DatabaseUrl(tokio_postgres::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres connection closed")]
    Closed,
    #[error("postgres did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("too many demo requests at once")]
    Busy,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("no such row")]
    NotFound,
    #[error("no PGFANOUT_TOKEN_HMAC_SECRET_KEY: the page connects without a token")]
    NoTokens,
    #[error("cannot sign a token: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
}

impl IntoResponse for DemoError {
    fn into_response(self) -> Response {
        let status = match &self {
            DemoError::BadRequest(_) => StatusCode::BAD_REQUEST,
            DemoError::NotFound | DemoError::NoTokens => StatusCode::NOT_FOUND,
            DemoError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            DemoError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            DemoError::Token(_)
            | DemoError::DatabaseUrl(_)
            | DemoError::Postgres(_)
            | DemoError::Closed => {
                tracing::warn!(error = %self, "demo request failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// How the demo signs its page's connection tokens.
pub struct Signer {
    /// From `PGFANOUT_TOKEN_HMAC_SECRET_KEY` (HS256).
    key: jsonwebtoken::EncodingKey,
    /// `PGFANOUT_TOKEN_AUDIENCE` and `PGFANOUT_TOKEN_ISSUER`, which tokens must carry if set.
    rules: crate::auth::TokenRules,
}

impl Signer {
    pub fn new(hmac_secret: &str, rules: crate::auth::TokenRules) -> Signer {
        Signer {
            key: jsonwebtoken::EncodingKey::from_secret(hmac_secret.as_bytes()),
            rules,
        }
    }

    /// A token for a fresh demo user that may subscribe to [`CHANNEL`] for [`TOKEN_TTL`].
    fn sign(&self) -> Result<String, DemoError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut claims = serde_json::json!({
            "sub": format!("demo-{:08x}", rand::random::<u32>()),
            "iat": now,
            "exp": now + TOKEN_TTL.as_secs(),
            "channels": [CHANNEL],
        });
        if let Some(aud) = &self.rules.audience {
            claims["aud"] = aud.as_str().into();
        }
        if let Some(iss) = &self.rules.issuer {
            claims["iss"] = iss.as_str().into();
        }
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

/// The demo's state: how to reach Postgres, how many requests may at once, and how to sign
/// tokens.
pub struct Demo {
    /// `PGFANOUT_DATABASE_URL` with our own `application_name`.
    database: tokio_postgres::Config,
    /// Bounds the Postgres connections the API opens.
    permits: Arc<Semaphore>,
    /// None: the page connects anonymously.
    signer: Option<Signer>,
}

impl Demo {
    /// # Errors
    /// The database URL does not parse.
    pub fn new(database_url: &str, signer: Option<Signer>) -> Result<Demo, DemoError> {
        let mut database: tokio_postgres::Config =
            database_url.parse().map_err(DemoError::DatabaseUrl)?;
        database.application_name(APPLICATION_NAME);
        Ok(Demo {
            database,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
            signer,
        })
    }

    /// Creates the demo table and its triggers, retrying with backoff until it succeeds or
    /// `cancel` fires.
    pub async fn setup(self: Arc<Self>, cancel: CancellationToken) {
        let mut delay = Duration::from_millis(200);
        loop {
            let attempt = self.run(|client| async move { client.batch_execute(SETUP_SQL).await });
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                result = attempt => result,
            };
            match result {
                Ok(()) => {
                    tracing::info!(table = TABLE, channel = CHANNEL, "demo table ready");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot create the demo table")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// Runs `work` on a fresh connection, if a permit is free.
    async fn with_db<T, F, Fut>(&self, work: F) -> Result<T, DemoError>
    where
        F: FnOnce(tokio_postgres::Client) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let _permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| DemoError::Busy)?;
        self.run(work).await
    }

    /// Connects, runs `work` while driving the connection, and closes it (on drop), all
    /// within [`REQUEST_TIMEOUT`]: no task is spawned.
    async fn run<T, F, Fut>(&self, work: F) -> Result<T, DemoError>
    where
        F: FnOnce(tokio_postgres::Client) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let attempt = async {
            let (client, connection) = self.database.connect(NoTls).await?;
            let work = work(client);
            tokio::pin!(work, connection);
            tokio::select! {
                result = &mut work => Ok(result?),
                result = &mut connection => Err(result.err().map_or(DemoError::Closed, DemoError::Postgres)),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, attempt)
            .await
            .map_err(|_| DemoError::Timeout)?
    }
}

/// `/demo/…`: the page and its API.
pub fn router(demo: Arc<Demo>) -> Router {
    let mut router = Router::new().route("/demo", get(|| async { Redirect::permanent("/demo/") }));
    for &(path, content_type, body) in ASSETS {
        let headers = [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ];
        router = router.route(
            &format!("/demo/{path}"),
            get(move || async move { (headers, body) }),
        );
    }
    router
        .route("/demo/api/config", get(config))
        .route("/demo/api/token", get(token))
        .route("/demo/api/rows", get(list).post(insert))
        .route("/demo/api/rows/{id}/bump", post(bump))
        .route("/demo/api/rows/{id}", delete(remove))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(demo)
}

async fn config(State(demo): State<Arc<Demo>>) -> Response {
    let tokens = demo.signer.is_some();
    Json(serde_json::json!({ "channel": CHANNEL, "table": TABLE, "tokens": tokens }))
        .into_response()
}

/// A connection token for the page (404 when the demo has no key to sign with).
async fn token(State(demo): State<Arc<Demo>>) -> Result<Response, DemoError> {
    let token = demo.signer.as_ref().ok_or(DemoError::NoTokens)?.sign()?;
    let ttl = TOKEN_TTL.as_secs();
    Ok(Json(serde_json::json!({ "token": token, "expires_in": ttl })).into_response())
}

/// The newest [`SNAPSHOT_ROWS`] rows, each in the form the trigger sends.
async fn list(State(demo): State<Arc<Demo>>) -> Result<Response, DemoError> {
    let rows: String = demo
        .with_db(|client| async move {
            let sql = "SELECT coalesce(json_agg(t ORDER BY t.id), '[]')::text FROM \
                       (SELECT * FROM public.pgfanout_demo ORDER BY id DESC LIMIT $1) t";
            client.query_one(sql, &[&SNAPSHOT_ROWS]).await?.try_get(0)
        })
        .await?;
    let body = format!(r#"{{"rows":{rows}}}"#);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize)]
struct InsertRequest {
    label: String,
    #[serde(default = "one")]
    count: i32,
}

fn one() -> i32 {
    1
}

/// Inserts `count` rows labelled `label` (numbered when more than one), in one statement.
async fn insert(
    State(demo): State<Arc<Demo>>,
    Json(request): Json<InsertRequest>,
) -> Result<Response, DemoError> {
    let label = request.label.trim().to_owned();
    if label.is_empty() || label.chars().count() > MAX_LABEL {
        return Err(DemoError::BadRequest("label must be 1 to 100 characters"));
    }
    if !(1..=MAX_INSERT).contains(&request.count) {
        return Err(DemoError::BadRequest("count must be 1 to 500"));
    }
    let count = request.count;
    let inserted = demo
        .with_db(|client| async move {
            let sql = "INSERT INTO public.pgfanout_demo (label) \
                       SELECT CASE WHEN $2 = 1 THEN $1 ELSE $1 || ' ' || g END \
                       FROM generate_series(1, $2::int) AS g";
            client.execute(sql, &[&label, &count]).await
        })
        .await?;
    Ok(Json(serde_json::json!({ "inserted": inserted })).into_response())
}

async fn bump(State(demo): State<Arc<Demo>>, Path(id): Path<i64>) -> Result<Response, DemoError> {
    let sql = "UPDATE public.pgfanout_demo SET value = value + 1 WHERE id = $1";
    changed(
        demo.with_db(|c| async move { c.execute(sql, &[&id]).await })
            .await?,
    )
}

async fn remove(State(demo): State<Arc<Demo>>, Path(id): Path<i64>) -> Result<Response, DemoError> {
    let sql = "DELETE FROM public.pgfanout_demo WHERE id = $1";
    changed(
        demo.with_db(|c| async move { c.execute(sql, &[&id]).await })
            .await?,
    )
}

fn changed(rows: u64) -> Result<Response, DemoError> {
    if rows == 0 {
        return Err(DemoError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
