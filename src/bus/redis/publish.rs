//! Publishing into the bus: the publish script (`publish.lua`) called for a batch of
//! publications at once, per slot on a Cluster, and its answers read back in order.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use redis::Value;

use super::{cluster, keys, ttl_secs, RedisBus};
use crate::bus::{
    new_epoch, BusError, Fence, FenceRecord, PublishOutcome, PublishRequest, DEDUPE_TTL,
};

/// Publications per call of the publish script at most (a batch is split beyond it): one
/// call runs atomically, so this bounds how long Redis serves nothing else.
pub const MAX_SCRIPT_PUBLICATIONS: usize = 256;
/// Payload bytes per call of the publish script at most (at least one publication a call).
pub const MAX_SCRIPT_BYTES: usize = 1 << 20;

impl RedisBus {
    /// Publishes one message: a batch of one (see [`RedisBus::publish_batch`]).
    ///
    /// # Errors
    /// Redis unreachable or a script failure: the outcome is unknown.
    pub async fn publish(&self, req: PublishRequest<'_>) -> Result<PublishOutcome, BusError> {
        self.publish_batch(std::slice::from_ref(&req))
            .await
            .pop()
            .unwrap_or(Err(BusError::NotAttempted))
    }

    /// Publishes `reqs` in order, as few round trips as the batch allows: one script call
    /// per [`MAX_SCRIPT_PUBLICATIONS`] (or [`MAX_SCRIPT_BYTES`]) on one Redis; on a Cluster
    /// one per slot (all slots at once) after one fence check per lease. One answer per
    /// request. A request is never applied after an earlier one of its channel that was not
    /// (failed, fenced, or not attempted): on one Redis nothing after the first fenced or
    /// failed request is attempted; on a Cluster, other slots go on.
    pub async fn publish_batch(
        &self,
        reqs: &[PublishRequest<'_>],
    ) -> Vec<Result<PublishOutcome, BusError>> {
        if self.inner.commands.is_cluster() {
            return self.publish_batch_cluster(reqs).await;
        }
        let mut results = Vec::with_capacity(reqs.len());
        let items: Vec<Item<'_, '_>> = reqs
            .iter()
            .map(|req| Item {
                req,
                dedupe: req.idempotency_key.map(|k| keys::dedupe(req.channel, k)),
                deadline: 0,
            })
            .collect();
        for chunk in chunks(&items) {
            if stopped(&results) {
                break;
            }
            results.extend(self.run_script(chunk, false).await);
        }
        results.resize_with(reqs.len(), || Err(BusError::NotAttempted));
        results
    }

    /// A batch on a Cluster: the leases are checked first in their own slot (once per fence),
    /// then each slot's publications go in one script call per chunk, the slots at once, and
    /// the fence records follow for what was settled in batch order (see `cluster`).
    async fn publish_batch_cluster(
        &self,
        reqs: &[PublishRequest<'_>],
    ) -> Vec<Result<PublishOutcome, BusError>> {
        let mut results: Vec<Option<Result<PublishOutcome, BusError>>> =
            (0..reqs.len()).map(|_| None).collect();
        // One check per lease: when the publications must land by (None: not held).
        let mut deadlines: Vec<(&str, &str, Deadline)> = Vec::new();
        for fence in reqs.iter().filter_map(|r| r.fence) {
            if !deadlines
                .iter()
                .any(|(k, t, _)| *k == fence.key && *t == fence.token)
            {
                let mut conn = self.inner.commands.clone();
                let until = cluster::fence_deadline(&mut conn, &self.inner.fence, fence)
                    .await
                    .map_err(Arc::new);
                deadlines.push((&fence.key, &fence.token, until));
            }
        }
        let deadline_of = |fence: &Fence| {
            deadlines
                .iter()
                .find(|(k, t, _)| *k == fence.key && *t == fence.token)
                .map(|(_, _, until)| until.clone())
        };
        // Per slot, in batch order; a slot stops at its first request that cannot go.
        let mut groups: BTreeMap<u16, Vec<(usize, Item<'_, '_>)>> = BTreeMap::new();
        let mut blocked: HashSet<u16> = HashSet::new();
        for (i, req) in reqs.iter().enumerate() {
            let slot = crate::bus::slot::of(req.channel.as_bytes());
            if blocked.contains(&slot) {
                results[i] = Some(Err(BusError::NotAttempted));
                continue;
            }
            let mut deadline = 0;
            if let Some(fence) = req.fence {
                match deadline_of(fence) {
                    Some(Ok(Some(until))) => deadline = until,
                    Some(Ok(None)) => {
                        results[i] = Some(Ok(PublishOutcome::Fenced));
                        blocked.insert(slot);
                        continue;
                    }
                    Some(Err(e)) => {
                        results[i] = Some(Err(BusError::Batch(e)));
                        blocked.insert(slot);
                        continue;
                    }
                    None => {}
                }
            }
            // The record's "already published" check becomes a dedupe key named after it,
            // in the channel's slot (atomic with the publication); the record itself is
            // written after the publication.
            let dedupe = match req.fence.and_then(|f| f.record.as_ref()) {
                Some(r) => Some(keys::dedupe(req.channel, &format!("{}={}", r.key, r.value))),
                None => req.idempotency_key.map(|k| keys::dedupe(req.channel, k)),
            };
            groups.entry(slot).or_default().push((
                i,
                Item {
                    req,
                    dedupe,
                    deadline,
                },
            ));
        }
        let runs = groups.into_values().map(|group| async move {
            let (indices, items): (Vec<usize>, Vec<Item<'_, '_>>) = group.into_iter().unzip();
            let mut answers = Vec::with_capacity(items.len());
            for chunk in chunks(&items) {
                if stopped(&answers) {
                    break;
                }
                answers.extend(self.run_script(chunk, true).await);
            }
            answers.resize_with(items.len(), || Err(BusError::NotAttempted));
            indices.into_iter().zip(answers).collect::<Vec<_>>()
        });
        for (i, answer) in futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
        {
            results[i] = Some(answer);
        }
        let mut results: Vec<Result<PublishOutcome, BusError>> = results
            .into_iter()
            .map(|r| r.unwrap_or(Err(BusError::NotAttempted)))
            .collect();
        self.write_records(reqs, &mut results).await;
        results
    }

    /// On a Cluster: writes each fence record for the last request of the settled prefix of
    /// the batch (every request before it published or a duplicate) that carries it. A
    /// failure turns that request's answer into the error, so the caller retries it: the
    /// dedupe key answers "duplicate" and the record is written then.
    async fn write_records(
        &self,
        reqs: &[PublishRequest<'_>],
        results: &mut [Result<PublishOutcome, BusError>],
    ) {
        let settled = results
            .iter()
            .take_while(|r| {
                matches!(
                    r,
                    Ok(PublishOutcome::Published { .. } | PublishOutcome::Duplicate { .. })
                )
            })
            .count();
        let mut last: Vec<(&Fence, &FenceRecord, usize)> = Vec::new();
        for (i, req) in reqs.iter().enumerate().take(settled) {
            let Some(fence) = req.fence else { continue };
            let Some(record) = fence.record.as_ref() else {
                continue;
            };
            match last.iter_mut().find(|(f, r, _)| {
                f.key == fence.key && f.token == fence.token && r.key == record.key
            }) {
                Some(entry) => *entry = (fence, record, i),
                None => last.push((fence, record, i)),
            }
        }
        for (fence, record, i) in last {
            let mut conn = self.inner.commands.clone();
            if let Err(e) =
                cluster::write_record(&mut conn, &self.inner.record, fence, record).await
            {
                results[i] = Err(e.into());
            }
        }
    }

    /// One call of the publish script for `items` (at most one slot's keys on a Cluster):
    /// one answer per item, [`BusError::NotAttempted`] after a fenced one; every answer the
    /// error when the call failed (its outcome is unknown).
    async fn run_script(
        &self,
        items: &[Item<'_, '_>],
        cluster: bool,
    ) -> Vec<Result<PublishOutcome, BusError>> {
        let meta_ttl = ttl_secs(self.inner.history.meta_ttl);
        let mut invocation = self.inner.publish.prepare_invoke();
        invocation
            .arg(meta_ttl)
            .arg(ttl_secs(DEDUPE_TTL))
            .arg(if cluster { "SPUBLISH" } else { "PUBLISH" })
            .arg(new_epoch());
        for item in items {
            let req = item.req;
            let h = self.inner.history.for_channel(req.channel);
            let meta = keys::meta(req.channel);
            // On a Cluster the lease and the record live in another slot: see `cluster`.
            let fence = req.fence.filter(|_| !cluster);
            let record = fence.and_then(|f| f.record.as_ref());
            invocation
                .key(&meta)
                .key(keys::history(req.channel))
                .key(item.dedupe.as_deref().unwrap_or(&meta))
                .key(fence.map_or(meta.as_str(), |f| f.key.as_str()))
                .key(record.map_or(meta.as_str(), |r| r.key.as_str()))
                .arg(&req.data[..])
                .arg(h.size)
                .arg(ttl_secs(h.ttl))
                .arg(keys::pubsub(req.channel))
                .arg(if item.dedupe.is_some() { "1" } else { "0" })
                .arg(fence.map_or("", |f| f.token.as_str()))
                .arg(req.received_at.unwrap_or_else(crate::bus::now_micros))
                .arg(record.map_or("", |r| r.value.as_str()))
                .arg(item.deadline);
        }
        let mut conn = self.inner.commands.clone();
        match invocation.invoke_async::<Value>(&mut conn).await {
            Ok(reply) => match parse_publish_reply(reply, items.len()) {
                Ok(outcomes) => {
                    let mut answers: Vec<_> = outcomes.into_iter().map(Ok).collect();
                    answers.resize_with(items.len(), || Err(BusError::NotAttempted));
                    answers
                }
                Err(e) => {
                    let e = e.to_string();
                    items
                        .iter()
                        .map(|_| Err(BusError::Protocol(e.clone())))
                        .collect()
                }
            },
            Err(e) => {
                let e = Arc::new(e);
                items
                    .iter()
                    .map(|_| Err(BusError::Batch(e.clone())))
                    .collect()
            }
        }
    }
}

/// The fence check of a lease on a Cluster: until when publications may land (ms since the
/// Unix epoch), None when the lease is not held, or the error of the check.
type Deadline = Result<Option<u64>, Arc<redis::RedisError>>;

/// A request as one publish script call sends it.
struct Item<'r, 'a> {
    req: &'r PublishRequest<'a>,
    /// The dedupe key (idempotency key, or on a Cluster the fence record's name).
    dedupe: Option<String>,
    /// On a Cluster, the fence deadline (ms since the Unix epoch); 0: none.
    deadline: u64,
}

/// Splits `items` into script calls of at most [`MAX_SCRIPT_PUBLICATIONS`] and
/// [`MAX_SCRIPT_BYTES`] (at least one item each), in order.
fn chunks<'s, 'r, 'a>(items: &'s [Item<'r, 'a>]) -> impl Iterator<Item = &'s [Item<'r, 'a>]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len().min(MAX_SCRIPT_PUBLICATIONS) {
            bytes += rest[n].req.data.len();
            if n > 0 && bytes > MAX_SCRIPT_BYTES {
                break;
            }
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Whether a batch stops after these answers: the last one was not applied.
fn stopped(answers: &[Result<PublishOutcome, BusError>]) -> bool {
    answers.last().is_some_and(|a| {
        !matches!(
            a,
            Ok(PublishOutcome::Published { .. } | PublishOutcome::Duplicate { .. })
        )
    })
}

/// The publish script's answers: `{status, offset, epoch}` per publication, at most `max`.
fn parse_publish_reply(reply: Value, max: usize) -> Result<Vec<PublishOutcome>, BusError> {
    let bad = |what: &str| BusError::Protocol(format!("publish reply: {what}"));
    let Value::Array(values) = reply else {
        return Err(bad("not an array"));
    };
    if values.len() % 3 != 0 || values.len() / 3 > max {
        return Err(bad("length"));
    }
    let mut out = Vec::with_capacity(values.len() / 3);
    let mut it = values.into_iter();
    while let (Some(status), Some(offset), Some(epoch)) = (it.next(), it.next(), it.next()) {
        let offset = match offset {
            Value::Int(n) => u64::try_from(n).map_err(|_| bad("negative offset"))?,
            _ => return Err(bad("offset")),
        };
        let epoch = match epoch {
            Value::BulkString(b) => String::from_utf8(b).map_err(|_| bad("epoch"))?,
            Value::SimpleString(s) => s,
            _ => return Err(bad("epoch")),
        };
        out.push(match status {
            Value::Int(1) => PublishOutcome::Published { offset, epoch },
            Value::Int(2) => PublishOutcome::Duplicate { offset },
            Value::Int(0) => PublishOutcome::Fenced,
            other => return Err(bad(&format!("status {other:?}"))),
        });
    }
    Ok(out)
}
