//! Finding tasks for operators: by state or by parent job, newest change first, a page at a time.
//! Every query here runs on an index — `state_updated_at` (equality on `state`, range and order
//! on `updated_at`), or `parent_id_updated_at` for a job's children (partial: only child tasks pay
//! for it) — so a page costs the same on a large collection as on a small one. A task name, a
//! route, a root-cause text or a creation-time range narrows the page within that scan; none of them is an index of its
//! own, because every index on `Tasks` is written on every state change of every task.
//!
//! For a finished task `updated_at` is when it finished, so `since`/`until` with a final state is
//! a range on the finish time.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime};

use super::tasks::TaskRepository;
use super::{StoreError, TaskDocument};
use crate::domain::TaskState;

/// Most tasks in one page.
pub(crate) const MAX_PAGE: u32 = 500;

/// Where the next page starts: after the task that ended this one (`updated_at`, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub updated_at_ms: i64,
    pub id: String,
}

impl Cursor {
    /// `<milliseconds>.<task id>`, as [`Cursor::parse`] reads it back.
    pub(crate) fn encode(&self) -> String {
        format!("{}.{}", self.updated_at_ms, self.id)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (ms, id) = text.split_once('.')?;
        Some(Self {
            updated_at_ms: ms.parse().ok()?,
            id: crate::domain::TaskId::parse(id).ok()?.to_string(),
        })
    }
}

/// One page of a search.
#[derive(Debug, Clone, Default)]
pub struct Search {
    /// Default `FAILURE`, unless `parent_id` or `workflow_id` is given (then: any state).
    pub state: Option<TaskState>,
    pub task_name: Option<String>,
    /// The route (queue suffix) it was sent to.
    pub route: Option<String>,
    /// Children of this task (a sharded job's shards, say).
    pub parent_id: Option<String>,
    /// Steps of this workflow (any state unless `state` says): their ids are `<workflow>:…`, so
    /// the `_id` index finds them.
    pub workflow_id: Option<String>,
    /// Root cause containing this text (case-insensitive).
    pub root_cause: Option<String>,
    /// Created at or after this time (narrows the scan; no index of its own).
    pub created_since: Option<DateTime>,
    /// Created before this time.
    pub created_until: Option<DateTime>,
    /// Changed at or after this time.
    pub since: Option<DateTime>,
    /// Changed before this time.
    pub until: Option<DateTime>,
    pub after: Option<Cursor>,
    pub limit: u32,
}

impl TaskRepository {
    /// Stored documents matching `search` (among `only`, when given, in any waiting state),
    /// most recently changed first; the cursor of the next page when there may be one. Readers
    /// go through [`TaskRepository::find`], which lays the running attempts over them.
    #[tracing::instrument(name = "store.tasks.search", skip(self, only))]
    pub(super) async fn search(
        &self,
        search: &Search,
        only: Option<&[&str]>,
    ) -> Result<(Vec<TaskDocument>, Option<Cursor>), StoreError> {
        let mut filter = search.filter();
        if let Some(ids) = only {
            filter.insert("_id", doc! {"$in": ids});
            filter.insert(
                "state",
                doc! {"$in": super::tasks::states(&[TaskState::Pending, TaskState::Retry, TaskState::Started])},
            );
        }
        let limit = search.limit.clamp(1, MAX_PAGE);
        let tasks: Vec<TaskDocument> = self
            .collection
            .find(filter)
            .sort(doc! {"updated_at": -1, "_id": -1})
            .limit(i64::from(limit))
            .await?
            .try_collect()
            .await?;
        let next = (tasks.len() == limit as usize)
            .then(|| tasks.last())
            .flatten()
            .map(|last| Cursor {
                updated_at_ms: last.updated_at.timestamp_millis(),
                id: last.id.to_string(),
            });
        Ok((tasks, next))
    }

    /// The winning plan of `search`'s query as the server explains it (`queryPlanner`), for a
    /// check that it runs on an index.
    pub async fn explain_search(
        &self,
        search: &Search,
    ) -> Result<mongodb::bson::Document, StoreError> {
        let command = doc! {
            "explain": {
                "find": super::tasks::COLLECTION,
                "filter": search.filter(),
                "sort": {"updated_at": -1, "_id": -1},
                "limit": i64::from(search.limit.clamp(1, MAX_PAGE)),
            },
            "verbosity": "queryPlanner",
        };
        Ok(self
            .collection
            .client()
            .database(self.collection.namespace().db.as_str())
            .run_command(command)
            .await?)
    }
}

impl Search {
    fn filter(&self) -> mongodb::bson::Document {
        let search = self;
        let mut range = doc! {};
        if let Some(since) = search.since {
            range.insert("$gte", since);
        }
        if let Some(until) = search.until {
            range.insert("$lt", until);
        }
        let scope = match (&search.parent_id, &search.workflow_id) {
            (Some(parent), _) => Some(doc! {"parent_id": parent}),
            (None, Some(workflow)) => Some(doc! {"_id": mongodb::bson::Regex {
                pattern: format!("^{}:", regex_escape(workflow)),
                options: String::new(),
            }}),
            (None, None) => None,
        };
        let mut filter = match (scope, search.state) {
            (Some(mut filter), state) => {
                if let Some(state) = state {
                    filter.insert("state", state.as_str());
                }
                filter
            }
            (None, state) => doc! {"state": state.unwrap_or(TaskState::Failure).as_str()},
        };
        if !range.is_empty() {
            filter.insert("updated_at", range);
        }
        if let Some(name) = &search.task_name {
            filter.insert("task_name", name);
        }
        if let Some(route) = &search.route {
            filter.insert("route", route);
        }
        let mut created = doc! {};
        if let Some(since) = search.created_since {
            created.insert("$gte", since);
        }
        if let Some(until) = search.created_until {
            created.insert("$lt", until);
        }
        if !created.is_empty() {
            filter.insert("created_at", created);
        }
        if let Some(text) = &search.root_cause {
            filter.insert(
                "root_cause",
                mongodb::bson::Regex {
                    pattern: regex_escape(text),
                    options: "i".into(),
                },
            );
        }
        if let Some(after) = &search.after {
            let at = DateTime::from_millis(after.updated_at_ms);
            filter.insert(
                "$or",
                vec![
                    doc! {"updated_at": {"$lt": at}},
                    doc! {"updated_at": at, "_id": {"$lt": &after.id}},
                ],
            );
        }
        filter
    }
}

/// `text` as a regular expression matching itself.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl TaskRepository {
    /// How many tasks each state has that changed since `since` (index-backed: one count per
    /// state).
    pub(super) async fn counts_since(
        &self,
        since: DateTime,
    ) -> Result<Vec<(TaskState, u64)>, StoreError> {
        let mut counts = Vec::new();
        for state in TaskState::ALL {
            let n = self
                .collection
                .count_documents(doc! {"state": state.as_str(), "updated_at": {"$gte": since}})
                .await?;
            counts.push((state, n));
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let cursor = Cursor {
            updated_at_ms: 1_700_000_000_123,
            id: "0b7e5ad2-4c1f-4a57-9a8e-2f0c5a1c0d11".into(),
        };
        assert_eq!(Cursor::parse(&cursor.encode()), Some(cursor));
        assert_eq!(Cursor::parse("soon.abc"), None);
        assert_eq!(Cursor::parse("12.a/b"), None);
        assert_eq!(Cursor::parse("12"), None);
    }

    #[test]
    fn root_cause_text_is_matched_literally() {
        assert_eq!(regex_escape("a.b (c)"), "a\\.b \\(c\\)");
        assert_eq!(regex_escape("plain"), "plain");
    }
}
