//! Idle stop: who is in each project's VM right now, when it was last
//! used, and the supervisor that stops VMs idle for longer than their
//! limit (through the VM state service, as Kennel itself).
//!
//! A project is *active* while anyone holds a [`Presence`] for it (every
//! SSH session and forward, every HTTPS request until its body ends,
//! every open WebSocket), and whenever its VMM used more than a set share
//! of a host core since the last look (a build left running under
//! `nohup` keeps it up). It is idle from the moment the last of those
//! ended. The supervisor looks every few seconds; a project idle for its
//! limit (its own, from `idle NAME 2h`, or `vm.idle_stop`) is stopped with
//! the note "idle 30m", the owner told in chat.
//!
//! Restarts: how long each running project has been idle is written down
//! every [`Executor::watch_idle`] `persist_every` and at shutdown. A new
//! daemon resumes each timer from there; time the daemon was down does
//! not count (nobody watched the guest then), so nothing stops early
//! because the daemon just started. A crash loses at most the last
//! `persist_every` of idleness, which only makes the stop later.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::executor::{Call, Event, Executor};
use crate::model::{AuditOutcome, Identity, IdleStop, Project, ProjectState};
use crate::names::ProjectName;
use crate::outcome::{Outcome, Reply};
use crate::provision::NoProgress;
use crate::store::repo;
use crate::store::StoreError;

/// One project's activity as the supervisor sees it.
#[derive(Debug, Clone, Copy)]
struct Track {
    /// Presences held now.
    open: usize,
    /// When it was last in use: someone left, or the guest was busy.
    last: Instant,
    /// The VMM's CPU time at the previous look, and when that was.
    cpu: Option<(Instant, Duration)>,
}

impl Track {
    fn fresh(at: Instant) -> Self {
        Self {
            open: 0,
            last: at,
            cpu: None,
        }
    }
}

/// Every project's activity. Shared by the executor and the presences it
/// hands out; cheap to lock (a map of small records).
#[derive(Debug, Default)]
pub(crate) struct Activity {
    map: Mutex<HashMap<ProjectName, Track>>,
}

/// Someone is in a project's VM (a session, a forward, a request, a
/// WebSocket) for as long as this lives. Take it *before* waking the VM:
/// then a VM that is just being stopped for idleness is not stopped once
/// this is held, and a wake that waits for that stop finds it held.
#[derive(Debug)]
#[must_use = "the project counts as in use only while this is held"]
pub struct Presence {
    activity: Arc<Activity>,
    name: ProjectName,
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.activity.with(&self.name, Instant::now(), |t| {
            t.open = t.open.saturating_sub(1);
        });
    }
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ProjectName, Track>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on `name`'s track (made if new) and marks it used at `at`.
    fn with(&self, name: &ProjectName, at: Instant, f: impl FnOnce(&mut Track)) {
        let mut map = self.lock();
        // Found by reference first: no copy of the name on the way of
        // every request and packet (this runs twice per HTTPS request).
        if !map.contains_key(name) {
            map.insert(name.clone(), Track::fresh(at));
        }
        if let Some(t) = map.get_mut(name) {
            f(t);
            t.last = t.last.max(at);
        }
    }

    pub(crate) fn enter(self: &Arc<Self>, name: &ProjectName) -> Presence {
        self.with(name, Instant::now(), |t| t.open += 1);
        Presence {
            activity: self.clone(),
            name: name.clone(),
        }
    }

    /// The VM just started: its idle time starts over.
    pub(crate) fn started(&self, name: &ProjectName, at: Instant) {
        self.with(name, at, |t| {
            t.last = at;
            t.cpu = None;
        });
    }

    /// The VM stopped: drop what is known unless someone is in already
    /// (waiting for it to start again).
    pub(crate) fn stopped(&self, name: &ProjectName) {
        let mut map = self.lock();
        if map.get(name).is_some_and(|t| t.open == 0) {
            map.remove(name);
        }
    }

    /// Whether `name` has been seen since this daemon started.
    pub(crate) fn tracks(&self, name: &ProjectName) -> bool {
        self.lock().contains_key(name)
    }

    /// Presences held for `name` now.
    pub(crate) fn open(&self, name: &ProjectName) -> usize {
        self.lock().get(name).map_or(0, |t| t.open)
    }

    /// Takes a look at `name` at `now`: the VMM's CPU time `cpu` counts as
    /// use when above `busy` of a core since the last look. A project seen
    /// for the first time (a restarted daemon) was idle `restored` already.
    /// Returns how long it has been idle.
    fn observe(
        &self,
        name: &ProjectName,
        now: Instant,
        cpu: Option<Duration>,
        busy: f64,
        restored: Duration,
    ) -> Duration {
        let mut map = self.lock();
        let t = map
            .entry(name.clone())
            .or_insert_with(|| Track::fresh(now.checked_sub(restored).unwrap_or(now)));
        if t.open > 0 {
            t.last = now;
        }
        if let (Some(c), Some((at, before))) = (cpu, t.cpu) {
            let wall = now.saturating_duration_since(at).as_secs_f64();
            let used = c.saturating_sub(before).as_secs_f64();
            if wall > 0.0 && used > wall * busy {
                t.last = now;
            }
        }
        if cpu.is_some() {
            t.cpu = cpu.map(|c| (now, c));
        }
        now.saturating_duration_since(t.last)
    }

    /// How long `name` has been idle at `now`; `None` if untracked.
    pub(crate) fn idle_for(&self, name: &ProjectName, now: Instant) -> Option<Duration> {
        self.lock().get(name).map(|t| {
            if t.open > 0 {
                Duration::ZERO
            } else {
                now.saturating_duration_since(t.last)
            }
        })
    }
}

/// A project's idle stop as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IdleView {
    /// The limit in force.
    pub limit: IdleStop,
    /// Whether that is the configured default (no `idle NAME ...` set).
    pub default: bool,
    /// How long the running VM has been idle (0 while in use); `None`
    /// when it is not running.
    pub idle_secs: Option<u64>,
}

/// What one look of the supervisor did, for the log and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IdleChecked {
    /// Projects stopped for idleness.
    pub stopped: Vec<ProjectName>,
}

impl Executor {
    /// A presence in `name`'s VM, for a gateway (see [`Presence`]).
    pub fn presence(&self, name: &ProjectName) -> Presence {
        self.activity.enter(name)
    }

    /// The limit in force for `p`.
    pub(crate) fn idle_limit(&self, p: &Project) -> IdleStop {
        p.idle_stop.unwrap_or(self.settings().idle_stop)
    }

    /// `p`'s idle stop for `status`.
    pub(crate) fn idle_view(&self, p: &Project) -> IdleView {
        IdleView {
            limit: self.idle_limit(p),
            default: p.idle_stop.is_none(),
            idle_secs: (p.state == ProjectState::Running)
                .then(|| self.activity.idle_for(&p.name, Instant::now()))
                .flatten()
                .map(|d| d.as_secs()),
        }
    }

    /// `idle NAME LIMIT`.
    pub(crate) async fn idle_cmd(
        &self,
        call: &Call<'_>,
        name: &ProjectName,
        limit: Option<IdleStop>,
    ) -> Outcome {
        call.project(name)?;
        let n = name.clone();
        self.store
            .call(move |c| repo::set_idle_stop(c, &n, limit))
            .await?;
        let n = name.clone();
        let project = self
            .store
            .call(move |c| repo::project_by_name(c, &n))
            .await?
            .ok_or_else(|| {
                crate::outcome::CommandError::NotFound(format!("there is no project '{name}'"))
            })?;
        Ok(Reply::IdleSet {
            project: name.to_string(),
            idle: self.idle_view(&project),
        })
    }

    /// One look at every running project at `now`: those idle for their
    /// limit are stopped. The gateways' presences and the VMM's CPU time
    /// decide what counts as use.
    pub async fn check_idle(&self, now: Instant) -> Result<IdleChecked, StoreError> {
        let projects = self.store.call(|c| repo::list_projects(c, None)).await?;
        // What the last daemon wrote down matters only for projects seen
        // for the first time (after a restart): read it only then.
        let unseen = projects
            .iter()
            .any(|p| p.state == ProjectState::Running && !self.activity.tracks(&p.name));
        let recorded = if unseen {
            self.store.call(|c| repo::recorded_idle(c)).await?
        } else {
            Vec::new()
        };
        let busy = f64::from(self.settings().idle_cpu_percent) / 100.0;
        let mut done = IdleChecked::default();
        for p in projects
            .into_iter()
            .filter(|p| p.state == ProjectState::Running)
        {
            let restored = recorded
                .iter()
                .find(|(n, _)| *n == p.name)
                .map_or(Duration::ZERO, |(_, s)| Duration::from_secs(*s));
            let cpu = self.vms.cpu_time(&p.name).await;
            let idle = self.activity.observe(&p.name, now, cpu, busy, restored);
            let limit = self.idle_limit(&p);
            tracing::debug!(project = %p.name, idle_secs = idle.as_secs(), cpu_ms = cpu.map(|c| c.as_millis()), %limit, "idle check");
            let Some(max) = limit.duration() else {
                continue;
            };
            if idle >= max && self.idle_stop(&p, limit, max, now).await {
                done.stopped.push(p.name);
            }
        }
        Ok(done)
    }

    /// Stops `p` for idleness unless, under its VM lock, it turns out to
    /// be in use or no longer running. Returns whether it stopped.
    async fn idle_stop(&self, p: &Project, limit: IdleStop, max: Duration, now: Instant) -> bool {
        let name = &p.name;
        let _vm = self.lock_vm(name).await;
        let n = name.clone();
        let still = self
            .store
            .call(move |c| repo::project_by_name(c, &n))
            .await
            .ok()
            .flatten()
            .is_some_and(|q| q.state == ProjectState::Running);
        let idle = self.activity.idle_for(name, now).unwrap_or(Duration::ZERO);
        if !still || self.activity.open(name) > 0 || idle < max {
            return false;
        }
        let span = tracing::info_span!("idle_stop", project = %name, owner = %p.owner);
        self.idle_halt(p, limit).instrument(span).await
    }

    /// The stop itself, its note, audit entry and chat notice.
    async fn idle_halt(&self, p: &Project, limit: IdleStop) -> bool {
        let name = &p.name;
        tracing::info!(limit = %limit, "stopping an idle VM");
        let out = self.halt_vm(name, &NoProgress).await;
        let note = format!("idle {limit}");
        let (outcome, detail) = match &out {
            Ok(()) => {
                let (n, why) = (name.clone(), note.clone());
                if let Err(e) = self
                    .store
                    .call(move |c| {
                        repo::set_project_state_noted(c, &n, ProjectState::Stopped, Some(&why))?;
                        repo::record_idle(c, &[(n.clone(), 0)])
                    })
                    .await
                {
                    tracing::warn!(error = %e, "cannot note why the VM stopped");
                }
                (AuditOutcome::Ok, note)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not stop an idle VM");
                (
                    AuditOutcome::Failed,
                    crate::redact::redact(&e.to_string()).into_owned(),
                )
            }
        };
        self.audit_entry(
            &Identity::system(),
            None,
            "stop",
            Some(name.to_string()),
            outcome,
            Some(detail),
        )
        .await;
        if out.is_err() {
            return false;
        }
        self.activity.stopped(name);
        let owner = p.owner.clone();
        let identities = self
            .store
            .call(move |c| match repo::user_by_name(c, &owner)? {
                Some(u) => repo::identities_of(c, u.id),
                None => Ok(Vec::new()),
            })
            .await
            .unwrap_or_default();
        let _ = self.events.send(Event::IdleStopped {
            project: name.clone(),
            owner: p.owner.clone(),
            identities,
            after: limit,
        });
        true
    }

    /// Writes down how long each running project has been idle, for the
    /// next daemon (see the module's note on restarts).
    pub async fn record_idle(&self, now: Instant) -> Result<(), StoreError> {
        let projects = self.store.call(|c| repo::list_projects(c, None)).await?;
        let idle: Vec<(ProjectName, u64)> = projects
            .into_iter()
            .filter(|p| p.state == ProjectState::Running)
            .filter_map(|p| {
                let d = self.activity.idle_for(&p.name, now)?;
                Some((p.name, d.as_secs()))
            })
            .collect();
        if idle.is_empty() {
            return Ok(());
        }
        self.store.call(move |c| repo::record_idle(c, &idle)).await
    }

    /// Runs [`Executor::check_idle`] every `every`, writing idle times down
    /// every `persist_every` and once more when `shutdown` ends.
    pub async fn watch_idle(
        &self,
        every: Duration,
        persist_every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut persisted = Instant::now();
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {
                    let now = Instant::now();
                    match self.check_idle(now).await {
                        Ok(c) if !c.stopped.is_empty() => {
                            tracing::info!(stopped = ?c.stopped.iter().map(ProjectName::as_str).collect::<Vec<_>>(), "stopped idle VMs");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot check for idle VMs"),
                    }
                    if now.saturating_duration_since(persisted) >= persist_every {
                        persisted = now;
                        if let Err(e) = self.record_idle(now).await {
                            tracing::warn!(error = %e, "cannot write idle times down");
                        }
                    }
                }
            }
        }
        if let Err(e) = self.record_idle(Instant::now()).await {
            tracing::warn!(error = %e, "cannot write idle times down");
        }
    }
}

/// The owner's chat line for an idle stop.
pub fn idle_notice(project: &ProjectName, after: IdleStop) -> String {
    format!("{project} was stopped after {after} idle; ssh or https wakes it")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn n(s: &str) -> ProjectName {
        ProjectName::new(s).unwrap()
    }

    #[test]
    fn presence_keeps_a_project_in_use_and_leaving_starts_the_clock() {
        let a = Arc::new(Activity::default());
        let t0 = Instant::now();
        let here = a.enter(&n("p"));
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(
            a.observe(&n("p"), later, None, 0.05, Duration::ZERO),
            Duration::ZERO
        );
        drop(here);
        let idle = a
            .idle_for(&n("p"), later + Duration::from_secs(10))
            .unwrap();
        // Left "now" (after t0), so idle from then, not from t0.
        assert!(idle >= Duration::from_secs(10), "{idle:?}");
    }

    #[test]
    fn guest_cpu_above_the_share_counts_as_use() {
        let a = Activity::default();
        let t0 = Instant::now();
        let p = n("p");
        a.started(&p, t0);
        a.observe(&p, t0, Some(Duration::from_secs(1)), 0.05, Duration::ZERO);
        // 1 s of CPU in 10 s: 10 % > 5 %: busy.
        let t1 = t0 + Duration::from_secs(10);
        let idle = a.observe(&p, t1, Some(Duration::from_secs(2)), 0.05, Duration::ZERO);
        assert_eq!(idle, Duration::ZERO);
        // 0.1 s in 10 s: 1 %: idle since t1.
        let t2 = t1 + Duration::from_secs(10);
        let idle = a.observe(
            &p,
            t2,
            Some(Duration::from_millis(2100)),
            0.05,
            Duration::ZERO,
        );
        assert_eq!(idle, Duration::from_secs(10));
    }

    #[test]
    fn a_restarted_daemon_resumes_recorded_idleness() {
        let a = Activity::default();
        let now = Instant::now() + Duration::from_secs(10_000);
        let idle = a.observe(&n("p"), now, None, 0.05, Duration::from_secs(600));
        assert_eq!(idle, Duration::from_secs(600));
    }

    #[test]
    fn limits_parse_and_print_back() {
        assert_eq!(
            IdleStop::parse("30m").unwrap(),
            IdleStop::Secs { secs: 1800 }
        );
        assert_eq!(
            IdleStop::parse("1h 30m").unwrap(),
            IdleStop::Secs { secs: 5400 }
        );
        assert_eq!(IdleStop::parse("never").unwrap(), IdleStop::Never);
        assert_eq!(IdleStop::parse("OFF").unwrap(), IdleStop::Never);
        assert!(IdleStop::parse("1s").unwrap_err().contains("from 10s"));
        assert!(IdleStop::parse("soon")
            .unwrap_err()
            .contains("not a duration"));
        assert!(IdleStop::parse("99999d").is_err());
        assert_eq!(IdleStop::Secs { secs: 3600 }.to_string(), "1h");
        assert_eq!(IdleStop::from_secs(0), IdleStop::Never);
        assert_eq!(
            idle_notice(&n("myapp"), IdleStop::Secs { secs: 3600 }),
            "myapp was stopped after 1h idle; ssh or https wakes it"
        );
    }
}
