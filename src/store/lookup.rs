//! Batched reads by `_id`: many concurrent lookups of one collection, one `find` with `$in`.
//!
//! A worker looks its task up while its claim is on the way; a thousand claims a second must not
//! be a thousand queries a second. Lookups already queued join at once, then those arriving for
//! up to `linger`; a batch is one command, and at most `max_in_flight` are out at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Database;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::StoreError;

type Answer = Result<Option<Document>, StoreError>;

struct Lookup {
    collection: &'static str,
    id: String,
    reply: oneshot::Sender<Answer>,
}

/// Handle to the lookup task; clones share it.
#[derive(Clone)]
pub struct BatchReader {
    requests: mpsc::Sender<Lookup>,
}

/// Ids per `find` at most.
const MAX_IDS: usize = 500;

impl BatchReader {
    /// Starts the reader on the current tokio runtime.
    /// `count`: count and time each `find` here (the client's driver events do not).
    pub fn start(db: Database, linger: Duration, timeout: Duration, count: bool) -> Self {
        let (requests, inbox) = mpsc::channel(super::batch::MAX_QUEUED_WRITES);
        tokio::spawn(run(db, linger, timeout, count, inbox));
        Self { requests }
    }

    /// The document `id` of `collection`, read in a batch with others.
    pub async fn get(&self, collection: &'static str, id: &str) -> Answer {
        let (reply, answer) = oneshot::channel();
        let lookup = Lookup {
            collection,
            id: id.to_owned(),
            reply,
        };
        if self.requests.try_send(lookup).is_err() {
            return Err(StoreError::Unavailable(
                "too many lookups are waiting for MongoDB".into(),
            ));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the batch reader stopped".into())))
    }
}

async fn run(
    db: Database,
    linger: Duration,
    timeout: Duration,
    count: bool,
    mut inbox: mpsc::Receiver<Lookup>,
) {
    let slots = Arc::new(Semaphore::new(4));
    while let Some(first) = inbox.recv().await {
        let mut batch = vec![first];
        super::batch::gather(
            &mut inbox,
            &mut batch,
            Vec::push,
            |batch| batch.len() >= MAX_IDS,
            linger,
        )
        .await;
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut by_collection: HashMap<&'static str, Vec<Lookup>> = HashMap::new();
        for lookup in batch {
            by_collection
                .entry(lookup.collection)
                .or_default()
                .push(lookup);
        }
        let db = db.clone();
        tokio::spawn(async move {
            for (collection, lookups) in by_collection {
                let sent = std::time::Instant::now();
                let failed = !answer(&db, collection, lookups, timeout).await;
                if count {
                    super::note_command("find", collection, sent.elapsed(), failed);
                }
            }
            drop(permit);
        });
    }
}

/// Answers `lookups` with one `find`; `false` when it failed.
async fn answer(
    db: &Database,
    collection: &'static str,
    lookups: Vec<Lookup>,
    timeout: Duration,
) -> bool {
    let ids: Vec<&str> = lookups.iter().map(|l| l.id.as_str()).collect();
    let found = tokio::time::timeout(timeout, async {
        let cursor = db
            .collection::<Document>(collection)
            .find(doc! {"_id": {"$in": &ids}})
            .await?;
        cursor.try_collect::<Vec<Document>>().await
    })
    .await;
    match found {
        Ok(Ok(documents)) => {
            let by_id: HashMap<String, Document> = documents
                .into_iter()
                .filter_map(|d| match d.get("_id") {
                    Some(Bson::String(id)) => Some((id.clone(), d)),
                    _ => None,
                })
                .collect();
            for lookup in lookups {
                let _ = lookup.reply.send(Ok(by_id.get(&lookup.id).cloned()));
            }
            true
        }
        Ok(Err(error)) => {
            let error = StoreError::from(error);
            for lookup in lookups {
                let _ = lookup.reply.send(Err(error.clone()));
            }
            false
        }
        Err(_) => {
            for lookup in lookups {
                let _ = lookup.reply.send(Err(StoreError::Unavailable(
                    format!("no answer within {timeout:?}").into(),
                )));
            }
            false
        }
    }
}
