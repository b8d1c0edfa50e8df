//! Group commit: many writes from concurrent work, few MongoDB commands.
//!
//! Callers hand a [`Write`] to the [`BatchWriter`] and await its own answer. The writer gathers
//! the writes already queued, then those that arrive for up to `linger` after the first, until
//! the batch is full — and sends each collection's writes as one multi-statement `update` or `insert` command
//! (`ordered: false`). While `max_in_flight` commands are already out, new writes keep joining the
//! next batch: under load batches grow by themselves, at no cost in latency when idle.
//!
//! A multi-statement `update` reports errors per statement but not which statements matched, so a
//! conditional write is an *upsert keyed by `_id`*: when its filter does not match an existing
//! document, the insert half collides with that `_id` (error 11000), and that collision is the
//! answer "refused" for that statement alone ([`Written::Refused`]). A statement MongoDB rejects for
//! good fails alone; a command that fails as a whole (MongoDB down) fails each of its writes with
//! [`StoreError::Unavailable`]. A command refused as a whole for a reason one statement caused is
//! split, so the others still go through.
//!
//! Every write is checked when it is submitted (it must serialize and fit in a document), so a bad
//! value fails its own caller at once and never reaches a batch.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{self, doc, Bson, Document};
use mongodb::Database;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::StoreError;
use crate::cause::Cause;
use crate::telemetry::metrics::metrics;

/// Largest statement accepted: a document may be 16 MiB; the command around it needs room too.
const MAX_STATEMENT_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;
/// A batch stops growing past this many bytes (a command document is capped at 16 MiB).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// One write, to be batched with others of the same collection and kind.
#[derive(Debug, Clone)]
pub struct Write {
    pub collection: &'static str,
    pub op: WriteOp,
    /// What the write is for (`claim`, `outcome`, `error_log` …): the label of
    /// `kobe_mongo_statements_total`.
    pub purpose: &'static str,
}

#[derive(Debug, Clone)]
pub enum WriteOp {
    /// An upsert keyed by the filter's `_id`; refused when the filter does not match a document
    /// that exists (see the module docs).
    Upsert { filter: Document, update: Document },
    /// An insert; refused when a unique index already holds its key (`_id` included).
    Insert(Document),
}

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Applied (matched and updated, or inserted).
    Applied,
    /// An upsert's filter did not match (the document is not in a state this write may change),
    /// or an insert's key is taken.
    Refused,
}

pub(crate) type WriteResult = Result<Written, StoreError>;

/// Tuning of a [`BatchWriter`].
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// How long the first write of a batch waits for company.
    pub linger: Duration,
    /// Statements per command at most.
    pub max_statements: usize,
    /// Commands out at once; more writes wait and join the next batch.
    pub max_in_flight: usize,
    /// A command that takes longer fails its writes as unavailable.
    pub command_timeout: Duration,
    /// Count and time each command here (the client's driver events do not).
    pub count_commands: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            linger: Duration::from_millis(1),
            max_statements: 500,
            max_in_flight: 4,
            command_timeout: Duration::from_secs(10),
            count_commands: false,
        }
    }
}

/// A write handed to the writer and not answered yet.
pub struct Pending {
    reply: oneshot::Receiver<WriteResult>,
}

impl Pending {
    /// The write's own answer.
    pub async fn result(mut self) -> WriteResult {
        self.wait().await
    }

    /// The write's own answer, leaving the handle in place (to `select!` on it). Once it has
    /// answered, it answers again with "unavailable".
    pub async fn wait(&mut self) -> WriteResult {
        (&mut self.reply)
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the batch writer stopped".into())))
    }

    fn answered(result: WriteResult) -> Self {
        let (tx, reply) = oneshot::channel();
        let _ = tx.send(result);
        Self { reply }
    }
}

struct Entry {
    write: Write,
    bytes: usize,
    reply: oneshot::Sender<WriteResult>,
}

/// Handle to the group-commit task. Clones share it; it stops when the last handle is dropped,
/// after sending what it holds.
#[derive(Clone)]
pub struct BatchWriter {
    requests: mpsc::Sender<Entry>,
}

/// Writes waiting for the writer at most: while MongoDB stalls, more are refused at once as
/// unavailable (the caller holds or requeues its work) instead of piling up in memory.
pub(crate) const MAX_QUEUED_WRITES: usize = 20_000;

impl BatchWriter {
    /// Starts the writer on the current tokio runtime.
    pub fn start(db: Database, config: BatchConfig) -> Self {
        let (requests, inbox) = mpsc::channel(MAX_QUEUED_WRITES);
        tokio::spawn(run(db, config, inbox));
        Self { requests }
    }

    /// Queues a write; await [`Pending::result`] for its answer.
    pub fn submit(&self, write: Write) -> Pending {
        let bytes = match statement_size(&write.op) {
            Ok(bytes) => bytes,
            Err(error) => return Pending::answered(Err(error)),
        };
        let (reply, receiver) = oneshot::channel();
        let entry = Entry {
            write,
            bytes,
            reply,
        };
        match self.requests.try_send(entry) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(entry)) => {
                let _ = entry.reply.send(Err(StoreError::Unavailable(
                    format!("{MAX_QUEUED_WRITES} writes are already waiting for MongoDB").into(),
                )));
            }
            Err(mpsc::error::TrySendError::Closed(entry)) => {
                let _ = entry.reply.send(Err(StoreError::Unavailable(
                    "the batch writer stopped".into(),
                )));
            }
        }
        Pending { reply: receiver }
    }

    /// Queues a write and waits for its answer.
    pub async fn write(&self, write: Write) -> WriteResult {
        self.submit(write).result().await
    }
}

/// Serialized size of a statement, or why it can never be written.
fn statement_size(op: &WriteOp) -> Result<usize, StoreError> {
    let bytes = match op {
        WriteOp::Upsert { filter, update } => {
            let filter = bson::to_vec(filter).map_err(|e| StoreError::Rejected(Cause::of(e)))?;
            let update = bson::to_vec(update).map_err(|e| StoreError::Rejected(Cause::of(e)))?;
            filter.len() + update.len()
        }
        WriteOp::Insert(document) => bson::to_vec(document)
            .map_err(|e| StoreError::Rejected(Cause::of(e)))?
            .len(),
    };
    if bytes > MAX_STATEMENT_BYTES {
        return Err(StoreError::Rejected(
            format!("a document of {bytes} bytes is over MongoDB's 16 MiB limit").into(),
        ));
    }
    Ok(bytes)
}

/// Writes are batched per collection and kind: one command each.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    collection: &'static str,
    insert: bool,
}

impl Key {
    fn of(write: &Write) -> Self {
        Self {
            collection: write.collection,
            insert: matches!(write.op, WriteOp::Insert(_)),
        }
    }
}

async fn run(db: Database, config: BatchConfig, mut inbox: mpsc::Receiver<Entry>) {
    let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let mut batches: Vec<(Key, Vec<Entry>, usize)> = Vec::new();
    let full = |batches: &[(Key, Vec<Entry>, usize)]| {
        batches.iter().any(|(_, entries, bytes)| {
            entries.len() >= config.max_statements || *bytes >= MAX_BATCH_BYTES
        })
    };
    let add = |batches: &mut Vec<(Key, Vec<Entry>, usize)>, entry: Entry| {
        let key = Key::of(&entry.write);
        let bytes = entry.bytes;
        match batches.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, entries, total)) => {
                entries.push(entry);
                *total += bytes;
            }
            None => batches.push((key, vec![entry], bytes)),
        }
    };
    let mut closed = false;
    while !closed || !batches.is_empty() {
        if batches.is_empty() {
            match inbox.recv().await {
                Some(entry) => add(&mut batches, entry),
                None => break,
            }
        }
        closed = gather(
            &mut inbox,
            &mut batches,
            add,
            |b: &Vec<_>| full(b),
            config.linger,
        )
        .await;
        // Wait for a command slot; what arrives meanwhile joins this batch.
        let permit = loop {
            if closed || full(&batches) {
                break slots.clone().acquire_owned().await.ok();
            }
            tokio::select! {
                permit = slots.clone().acquire_owned() => break permit.ok(),
                entry = inbox.recv() => match entry {
                    Some(entry) => add(&mut batches, entry),
                    None => closed = true,
                },
            }
        };
        let Some(permit) = permit else { return };
        // One command per (collection, kind); each needs its own slot.
        let mut permit = Some(permit);
        for (key, entries, _) in std::mem::take(&mut batches) {
            let permit = match permit.take() {
                Some(permit) => permit,
                None => match slots.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            tokio::spawn(send(
                db.clone(),
                key,
                entries,
                config.command_timeout,
                config.count_commands,
                permit,
            ));
        }
    }
    // Wait for the commands still out, so their answers are delivered before the writer ends.
    let _ = slots.acquire_many(config.max_in_flight.max(1) as u32).await;
}

/// Fills a batch from `inbox`: whatever is queued already joins at once (a burst, a bulk
/// submission), then company may arrive for up to `linger`, until `full` says stop. `true` when
/// the inbox is closed. The group-commit writer and the batched reader gather alike.
pub(super) async fn gather<T, B>(
    inbox: &mut mpsc::Receiver<T>,
    batch: &mut B,
    add: impl Fn(&mut B, T),
    full: impl Fn(&B) -> bool,
    linger: Duration,
) -> bool {
    while !full(batch) {
        match inbox.try_recv() {
            Ok(item) => add(batch, item),
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    let deadline = tokio::time::Instant::now() + linger;
    while !full(batch) {
        tokio::select! {
            item = inbox.recv() => match item {
                Some(item) => add(batch, item),
                None => return true,
            },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    false
}

/// Sends one batch and answers each of its writes.
async fn send(
    db: Database,
    key: Key,
    entries: Vec<Entry>,
    timeout: Duration,
    count: bool,
    _permit: OwnedSemaphorePermit,
) {
    let m = metrics();
    m.mongo_batch_size
        .with_label_values(&[key.collection])
        .observe(entries.len() as f64);
    for entry in &entries {
        m.mongo_statements
            .with_label_values(&[entry.write.purpose])
            .inc();
    }
    let sent = std::time::Instant::now();
    let results = execute(&db, key, &entries, timeout).await;
    if count {
        let kind = if key.insert { "insert" } else { "update" };
        super::note_command(kind, key.collection, sent.elapsed(), results.is_err());
    }
    let results = match results {
        // Refused as a whole for a reason of its own making: one statement is at fault, so
        // send each alone to find it and let the others through.
        Err(error) if !error.is_transient() && entries.len() > 1 => {
            let mut one_by_one = Vec::with_capacity(entries.len());
            for entry in &entries {
                let single = execute(&db, key, std::slice::from_ref(entry), timeout).await;
                one_by_one.push(match single {
                    Ok(mut results) => results.remove(0),
                    Err(error) => Err(error),
                });
            }
            one_by_one
        }
        Err(error) => entries.iter().map(|_| Err(error.clone())).collect(),
        Ok(results) => results,
    };
    for (entry, result) in entries.into_iter().zip(results) {
        let _ = entry.reply.send(result);
    }
}

/// `command` with the write concern the URI (or the client's options) asks for. `run_command`
/// applies none of its own, so without this `w=majority&journal=true` would never reach the
/// writes an ack depends on.
fn with_write_concern(db: &Database, mut command: Document) -> Document {
    if let Some(concern) = db.write_concern() {
        match bson::to_document(concern) {
            Ok(concern) if !concern.is_empty() => {
                command.insert("writeConcern", concern);
            }
            _ => {}
        }
    }
    command
}

/// One command for `entries`; per-statement results, or the error of the whole command.
async fn execute(
    db: &Database,
    key: Key,
    entries: &[Entry],
    timeout: Duration,
) -> Result<Vec<WriteResult>, StoreError> {
    let command = if key.insert {
        let documents: Vec<Document> = entries
            .iter()
            .filter_map(|e| match &e.write.op {
                WriteOp::Insert(document) => Some(document.clone()),
                WriteOp::Upsert { .. } => None,
            })
            .collect();
        doc! {"insert": key.collection, "documents": documents, "ordered": false}
    } else {
        let updates: Vec<Document> = entries
            .iter()
            .filter_map(|e| match &e.write.op {
                WriteOp::Upsert { filter, update } => {
                    Some(doc! {"q": filter.clone(), "u": update.clone(), "upsert": true})
                }
                WriteOp::Insert(_) => None,
            })
            .collect();
        doc! {"update": key.collection, "updates": updates, "ordered": false}
    };
    let command = with_write_concern(db, command);
    let reply = tokio::time::timeout(timeout, db.run_command(command))
        .await
        .map_err(|_| StoreError::Unavailable(format!("no answer within {timeout:?}").into()))??;
    if let Ok(concern) = reply.get_document("writeConcernError") {
        // Written on the primary, not (yet) where the write concern asked: not acknowledged.
        return Err(StoreError::Unavailable(
            format!(
                "write concern not satisfied: {}",
                concern.get_str("errmsg").unwrap_or("unknown")
            )
            .into(),
        ));
    }
    let mut results: Vec<WriteResult> = entries.iter().map(|_| Ok(Written::Applied)).collect();
    if let Ok(errors) = reply.get_array("writeErrors") {
        for error in errors.iter().filter_map(Bson::as_document) {
            let index = match error.get("index") {
                Some(Bson::Int32(i)) => *i as usize,
                Some(Bson::Int64(i)) => *i as usize,
                _ => continue,
            };
            let code = match error.get("code") {
                Some(Bson::Int32(c)) => *c,
                Some(Bson::Int64(c)) => *c as i32,
                _ => 0,
            };
            let message = error.get_str("errmsg").unwrap_or("write error").to_owned();
            let Some(slot) = results.get_mut(index) else {
                continue;
            };
            *slot = match code {
                11000 => Ok(Written::Refused),
                code if super::is_transient_code(code) => {
                    Err(StoreError::Unavailable(message.into()))
                }
                _ => Err(StoreError::Rejected(message.into())),
            };
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_bson_cannot_hold_are_refused_at_submission() {
        let mut bad = Document::new();
        bad.insert("a\u{0}b", 1);
        let op = WriteOp::Upsert {
            filter: doc! {"_id": "x"},
            update: doc! {"$set": bad},
        };
        assert!(matches!(statement_size(&op), Err(StoreError::Rejected(_))));
        let huge = "x".repeat(MAX_STATEMENT_BYTES);
        let op = WriteOp::Insert(doc! {"_id": "x", "blob": huge});
        assert!(matches!(statement_size(&op), Err(StoreError::Rejected(_))));
        let fine = WriteOp::Insert(doc! {"_id": "x"});
        assert!(statement_size(&fine).unwrap() > 0);
    }

    #[tokio::test]
    async fn while_mongodb_stalls_writes_past_the_bound_are_refused_at_once() {
        // Nothing listens there: every command waits out its timeout, and the inbox fills.
        let db =
            mongodb::Client::with_uri_str("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=60000")
                .await
                .unwrap()
                .database("none");
        let writer = BatchWriter::start(
            db,
            BatchConfig {
                command_timeout: Duration::from_secs(60),
                ..BatchConfig::default()
            },
        );
        let write = || Write {
            collection: "Probe",
            op: WriteOp::Insert(doc! {"_id": "x"}),
            purpose: "test",
        };
        let mut pending: Vec<Pending> = (0..MAX_QUEUED_WRITES + 5_000)
            .map(|_| writer.submit(write()))
            .collect();
        let last = pending.pop().unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), last.result())
            .await
            .expect("answered at once, not after the command timeout");
        match answer {
            Err(StoreError::Unavailable(cause)) => {
                assert!(cause.to_string().contains("already waiting"), "{cause}")
            }
            other => panic!("{other:?}"),
        }
    }
}
