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

/// Rounds of a scan that fills a page from `Tasks` when the read model leaves documents out
/// (a `PENDING` search meets the tasks that have run since; a job's children of one state).
const MAX_ROUNDS: usize = 8;

impl TaskRepository {
    /// Tasks matching `search` as the read model has them (`STARTED` aside: see
    /// [`TaskRepository::find`]), the most recently changed first, and the cursor of the next page.
    ///
    /// A final state, or `RETRY`, is looked for among the outcomes (on their `state_at` index) and
    /// among the `Tasks` documents an operator or an earlier version wrote in it; the two are
    /// merged. `PENDING`, and any search within a job or a workflow, scans `Tasks` on its indexes
    /// and keeps what the read model still has in that state, a few rounds at most per page.
    #[tracing::instrument(name = "store.tasks.search", skip(self))]
    pub(super) async fn search(
        &self,
        search: &Search,
    ) -> Result<(Vec<TaskDocument>, Option<Cursor>), StoreError> {
        let scoped = search.parent_id.is_some() || search.workflow_id.is_some();
        match search.state.or((!scoped).then_some(TaskState::Failure)) {
            Some(state) if !scoped && state != TaskState::Pending => {
                self.merged(search, state).await
            }
            _ => self.scanned(search).await,
        }
    }

    /// A page of `Tasks` on its own order (`updated_at` as stored), composed and kept where the
    /// read model matches the search.
    async fn scanned(
        &self,
        search: &Search,
    ) -> Result<(Vec<TaskDocument>, Option<Cursor>), StoreError> {
        let limit = search.limit.clamp(1, MAX_PAGE) as usize;
        let mut after = search.after.clone();
        let mut kept: Vec<(Cursor, TaskDocument)> = Vec::new();
        for _ in 0..MAX_ROUNDS {
            let filter = search.tasks_filter(after.as_ref());
            let page: Vec<TaskDocument> = self
                .collection
                .find(filter)
                .sort(doc! {"updated_at": -1, "_id": -1})
                .limit(limit as i64)
                .await?
                .try_collect()
                .await?;
            let full = page.len() == limit;
            let keys: Vec<Cursor> = page.iter().map(key_of).collect();
            let mut page = page;
            self.overlay_all(&mut page).await?;
            kept.extend(
                keys.iter()
                    .cloned()
                    .zip(page)
                    .filter(|(_, task)| search.matches(task)),
            );
            if !full {
                kept.truncate(limit);
                let next = (kept.len() == limit)
                    .then(|| kept.last().map(|(k, _)| k.clone()))
                    .flatten();
                return Ok((kept.into_iter().map(|(_, t)| t).collect(), next));
            }
            after = keys.last().cloned();
            if kept.len() >= limit {
                break;
            }
        }
        let next = if kept.len() >= limit {
            kept.truncate(limit);
            kept.last().map(|(k, _)| k.clone())
        } else {
            after
        };
        Ok((kept.into_iter().map(|(_, t)| t).collect(), next))
    }

    /// A page of tasks in `state`: the outcomes in it and the `Tasks` documents stored in it,
    /// merged on the time they reached it.
    async fn merged(
        &self,
        search: &Search,
        state: TaskState,
    ) -> Result<(Vec<TaskDocument>, Option<Cursor>), StoreError> {
        let limit = search.limit.clamp(1, MAX_PAGE) as usize;
        let after = search.after.as_ref();
        let stored = async {
            let found: Vec<TaskDocument> = self
                .collection
                .find(search.tasks_filter(after))
                .sort(doc! {"updated_at": -1, "_id": -1})
                .limit(limit as i64)
                .await?
                .try_collect()
                .await?;
            Ok::<_, StoreError>(found)
        };
        let outcomes = self.outcomes.in_state(
            state,
            search.outcomes_filter(),
            after.map(|a| (DateTime::from_millis(a.updated_at_ms), a.id.as_str())),
            limit as i64,
        );
        let (stored, outcomes) = tokio::try_join!(stored, outcomes)?;
        // Each full source has looked only as far back as its last item: past the later of the
        // two, the next page looks.
        let frontier = [
            (stored.len() == limit)
                .then(|| stored.last().map(key_of))
                .flatten(),
            (outcomes.len() == limit)
                .then(|| {
                    outcomes.last().map(|o| Cursor {
                        updated_at_ms: o.at.timestamp_millis(),
                        id: o.task_id.clone(),
                    })
                })
                .flatten(),
        ]
        .into_iter()
        .flatten()
        .max_by(order);
        let mut ids: Vec<String> = stored.iter().map(|t| t.id.to_string()).collect();
        ids.extend(outcomes.iter().map(|o| o.task_id.clone()));
        ids.sort();
        ids.dedup();
        let mut tasks = self.read_model_of(&ids).await?;
        tasks.retain(|task| {
            search.matches(task)
                && after.is_none_or(|a| order(&key_of(task), a).is_lt())
                && frontier
                    .as_ref()
                    .is_none_or(|f| order(&key_of(task), f).is_ge())
        });
        tasks.sort_by(|a, b| order(&key_of(b), &key_of(a)));
        tasks.truncate(limit);
        let next = if tasks.len() == limit {
            tasks.last().map(key_of)
        } else {
            frontier
        };
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
                "filter": search.tasks_filter(None),
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
    /// The filter of a `Tasks` query for this search, after `after`: the fields no outcome
    /// changes (name, route, creation time, parent, workflow), and the state where documents
    /// are stored in it (`PENDING`, or a state an operator or an earlier version wrote).
    fn tasks_filter(&self, after: Option<&Cursor>) -> mongodb::bson::Document {
        let search = self;
        let scope = match (&search.parent_id, &search.workflow_id) {
            (Some(parent), _) => Some(doc! {"parent_id": parent}),
            (None, Some(workflow)) => Some(doc! {"_id": mongodb::bson::Regex {
                pattern: format!("^{}:", regex_escape(workflow)),
                options: String::new(),
            }}),
            (None, None) => None,
        };
        let mut filter = match scope {
            Some(filter) => filter,
            None => doc! {"state": search.state.unwrap_or(TaskState::Failure).as_str()},
        };
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
        if let Some(after) = after {
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

    /// The filter of a query of the outcomes for this search (its state and cursor aside).
    fn outcomes_filter(&self) -> mongodb::bson::Document {
        let mut filter = doc! {};
        let mut range = doc! {};
        if let Some(since) = self.since {
            range.insert("$gte", since);
        }
        if let Some(until) = self.until {
            range.insert("$lt", until);
        }
        if !range.is_empty() {
            filter.insert("at", range);
        }
        if let Some(name) = &self.task_name {
            filter.insert("task_name", name);
        }
        if let Some(text) = &self.root_cause {
            filter.insert(
                "root_cause",
                mongodb::bson::Regex {
                    pattern: regex_escape(text),
                    options: "i".into(),
                },
            );
        }
        filter
    }

    /// Whether the read model's `task` matches this search.
    pub(super) fn matches(&self, task: &TaskDocument) -> bool {
        let state = match (
            self.state,
            self.parent_id.is_some() || self.workflow_id.is_some(),
        ) {
            (Some(state), _) => task.state == state,
            (None, true) => true,
            (None, false) => task.state == TaskState::Failure,
        };
        let text = |wanted: &Option<String>, field: &Option<String>| {
            wanted.as_ref().is_none_or(|wanted| {
                field
                    .as_deref()
                    .is_some_and(|f| f.to_lowercase().contains(&wanted.to_lowercase()))
            })
        };
        state
            && self.task_name.as_ref().is_none_or(|n| *n == task.task_name)
            && self.route.as_ref().is_none_or(|r| *r == task.route)
            && self
                .parent_id
                .as_ref()
                .is_none_or(|p| task.parent_id.as_ref() == Some(p))
            && self
                .workflow_id
                .as_ref()
                .is_none_or(|w| task.id.as_str().starts_with(&format!("{w}:")))
            && text(&self.root_cause, &task.root_cause)
            && self.since.is_none_or(|since| task.updated_at >= since)
            && self.until.is_none_or(|until| task.updated_at < until)
            && self
                .created_since
                .is_none_or(|since| task.created_at >= since)
            && self
                .created_until
                .is_none_or(|until| task.created_at < until)
    }
}

/// Where `task` stands in a page's order.
fn key_of(task: &TaskDocument) -> Cursor {
    Cursor {
        updated_at_ms: task.updated_at.timestamp_millis(),
        id: task.id.to_string(),
    }
}

/// The order of pages: later changes first, then larger ids.
fn order(a: &Cursor, b: &Cursor) -> std::cmp::Ordering {
    (a.updated_at_ms, &a.id).cmp(&(b.updated_at_ms, &b.id))
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
    /// How many tasks each state has that changed since `since`, on indexes: the outcomes
    /// recorded since then by state, and the `Tasks` documents stored in a state since then;
    /// `PENDING` is the tasks submitted since then less the first attempts that ended since.
    pub(super) async fn counts_since(
        &self,
        since: DateTime,
    ) -> Result<Vec<(TaskState, u64)>, StoreError> {
        let (outcomes, first_ended) = self.outcomes.counts_since(since).await?;
        let mut counts = Vec::new();
        for state in TaskState::ALL {
            let stored = self
                .collection
                .count_documents(doc! {"state": state.as_str(), "updated_at": {"$gte": since}})
                .await?;
            let ended = outcomes
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            let n = match state {
                TaskState::Pending => stored.saturating_sub(first_ended),
                _ => stored.saturating_add(ended),
            };
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
