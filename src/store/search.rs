//! Finding tasks for operators: by state, newest change first, a page at a time. Every query
//! here runs on the `state_updated_at` index (equality on `state`, range and order on
//! `updated_at`), so a page costs the same on a large collection as on a small one; a task name
//! narrows the page within that scan.

use futures_util::TryStreamExt;
use mongodb::bson::{doc, DateTime};

use super::tasks::TaskRepository;
use super::{StoreError, TaskDocument};
use crate::domain::TaskState;

/// Most tasks in one page.
pub const MAX_PAGE: u32 = 500;

/// Where the next page starts: after the task that ended this one (`updated_at`, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub updated_at_ms: i64,
    pub id: String,
}

impl Cursor {
    /// `<milliseconds>.<task id>`, as [`Cursor::parse`] reads it back.
    pub fn encode(&self) -> String {
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
    pub state: Option<TaskState>,
    pub task_name: Option<String>,
    /// Changed at or after this time.
    pub since: Option<DateTime>,
    /// Changed before this time.
    pub until: Option<DateTime>,
    pub after: Option<Cursor>,
    pub limit: u32,
}

impl TaskRepository {
    /// Tasks in `search.state`, most recently changed first; the cursor of the next page when
    /// there may be one.
    #[tracing::instrument(name = "store.tasks.search", skip(self))]
    pub async fn search(
        &self,
        search: &Search,
    ) -> Result<(Vec<TaskDocument>, Option<Cursor>), StoreError> {
        let state = search.state.unwrap_or(TaskState::Failure);
        let mut range = doc! {};
        if let Some(since) = search.since {
            range.insert("$gte", since);
        }
        if let Some(until) = search.until {
            range.insert("$lt", until);
        }
        let mut filter = doc! {"state": state.as_str()};
        if !range.is_empty() {
            filter.insert("updated_at", range);
        }
        if let Some(name) = &search.task_name {
            filter.insert("task_name", name);
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
                id: last.id.clone(),
            });
        Ok((tasks, next))
    }

    /// How many tasks each state has that changed since `since` (index-backed: one count per
    /// state).
    pub async fn counts_since(&self, since: DateTime) -> Result<Vec<(TaskState, u64)>, StoreError> {
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
}
