//! Readiness state shared by the subsystems and reported on `/ready`.
//!
//! A node is ready when it has started (its bus is connected), every dependency it is
//! configured with is up, the schema migrations it needs are applied, and it is not
//! draining. Each subsystem sets its own part:
//! - ingest: [`Health::set_postgres`] — `true` only once connected **and** `LISTEN`ing on
//!   every configured channel (so "up" also means "subscribed to what it must");
//! - migrations: whoever applies them calls [`Health::set_migrations`] with
//!   [`MigrationState::Pending`] in the wiring of `run()` (before the node starts serving),
//!   then `Applied` (or `Failed`); left alone it stays `NotRequired`;
//! - the drain: [`Health::start_draining`].
//!
//! Redis is reported by the bus itself (`Bus::redis_up`).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// State of a dependency as `/ready` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependencyState {
    Disabled,
    Up,
    Down,
}

impl DependencyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Where the node's schema migrations stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// This node applies no migrations (no database, or migrations disabled).
    NotRequired,
    /// Migrations are needed and not applied yet: not ready.
    Pending,
    Applied,
    /// Applying them failed (the owner retries or the node stops): not ready.
    Failed,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotRequired => "not_required",
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Failed => "failed",
        }
    }

    /// Whether this state lets the node be ready.
    pub fn allows_ready(self) -> bool {
        matches!(self, Self::NotRequired | Self::Applied)
    }

    fn from_u8(x: u8) -> Self {
        [
            Self::NotRequired,
            Self::Pending,
            Self::Applied,
            Self::Failed,
        ]
        .into_iter()
        .find(|s| *s as u8 == x)
        .unwrap_or(Self::Failed)
    }
}

#[derive(Debug)]
pub struct Health {
    postgres: AtomicU8,
    migrations: AtomicU8,
    draining: AtomicBool,
}

impl Health {
    /// `postgres_enabled`: whether this node LISTENs at all.
    pub fn new(postgres_enabled: bool) -> Self {
        let initial = if postgres_enabled {
            DependencyState::Down
        } else {
            DependencyState::Disabled
        };
        Self {
            postgres: AtomicU8::new(initial as u8),
            migrations: AtomicU8::new(MigrationState::NotRequired as u8),
            draining: AtomicBool::new(false),
        }
    }

    /// `true`: connected and LISTENing on every configured channel.
    pub fn set_postgres(&self, up: bool) {
        let state = if up {
            DependencyState::Up
        } else {
            DependencyState::Down
        };
        self.postgres.store(state as u8, Ordering::Relaxed);
    }

    pub fn postgres(&self) -> DependencyState {
        match self.postgres.load(Ordering::Relaxed) {
            x if x == DependencyState::Disabled as u8 => DependencyState::Disabled,
            x if x == DependencyState::Up as u8 => DependencyState::Up,
            _ => DependencyState::Down,
        }
    }

    pub fn set_migrations(&self, state: MigrationState) {
        self.migrations.store(state as u8, Ordering::Relaxed);
    }

    pub fn migrations(&self) -> MigrationState {
        MigrationState::from_u8(self.migrations.load(Ordering::Relaxed))
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Readiness, given the bus' view of Redis (`Disabled` without Redis).
    pub fn ready(&self, redis: DependencyState) -> bool {
        !self.draining()
            && self.postgres() != DependencyState::Down
            && redis != DependencyState::Down
            && self.migrations().allows_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_every_configured_part() {
        let h = Health::new(true);
        assert!(!h.ready(DependencyState::Up), "postgres not listening yet");
        h.set_postgres(true);
        assert!(h.ready(DependencyState::Up));
        assert!(!h.ready(DependencyState::Down), "redis down");
        h.set_migrations(MigrationState::Pending);
        assert!(!h.ready(DependencyState::Up), "migrations pending");
        h.set_migrations(MigrationState::Applied);
        assert!(h.ready(DependencyState::Disabled));
        h.start_draining();
        assert!(!h.ready(DependencyState::Up), "draining");

        let alone = Health::new(false);
        assert!(alone.ready(DependencyState::Disabled));
        assert_eq!(alone.postgres(), DependencyState::Disabled);
        for s in [
            MigrationState::NotRequired,
            MigrationState::Pending,
            MigrationState::Applied,
            MigrationState::Failed,
        ] {
            alone.set_migrations(s);
            assert_eq!(alone.migrations(), s);
        }
    }
}
