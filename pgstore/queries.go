package pgstore

import (
	"embed"
	"fmt"
	"io/fs"
	"strings"
)

//go:embed queries/*.sql
var queryFS embed.FS

// query returns the text of queries/<name>.sql. A missing file is a build
// defect: it panics during package initialisation, so every test catches it.
func query(name string) string {
	b, err := fs.ReadFile(queryFS, "queries/"+name+".sql")
	if err != nil {
		panic(fmt.Sprintf("pgstore: missing embedded query %s: %v", name, err))
	}
	return strings.TrimSpace(string(b))
}

// Named queries (one statement each, except migrate_bootstrap).
var (
	qAssertLeaderTerm        = query("assert_leader_term")
	qClaimSelect             = query("claim_select")
	qClaimUpdate             = query("claim_update")
	qUnclaimTasks            = query("unclaim_tasks")
	qStartTasks              = query("start_tasks")
	qFinishTasks             = query("finish_tasks")
	qTaskStates              = query("task_states")
	qInFlightTasks           = query("in_flight_tasks")
	qResolveLost             = query("resolve_lost")
	qTimeOutTasks            = query("time_out_tasks")
	qPurgeHistoryBatch       = query("purge_history_batch")
	qTaskStatistics          = query("task_statistics")
	qAnalyzeTasks            = query("analyze_tasks")
	qLastAnalyze             = query("last_analyze")
	qSetLastHeavyMaintenance = query("set_last_heavy_maintenance")
	qLoadControl             = query("load_control")
	qLoadPools               = query("load_pools")
	qLoadTargets             = query("load_targets")
	qLeaderLockKey           = query("leader_lock_key")
	qLeaderTryLock           = query("leader_try_lock")
	qLeaderUnlock            = query("leader_unlock")
	qLeaderLockHolder        = query("leader_lock_holder")
	qLeaderTerminate         = query("leader_terminate")
	qLeaderRecord            = query("leader_record")
	qLeaderCurrentTerm       = query("leader_current_term")
	qLeaderRecordControl     = query("leader_record_control")
	qListen                  = query("listen")
	qCounts                  = query("counts")
	qRecentFailures          = query("recent_failures")
	qSchemaVersion           = query("schema_version")
	qSchemaExists            = query("schema_exists")
	qMigrateLock             = query("migrate_lock")
	qMigrateBootstrap        = query("migrate_bootstrap")
	qMigrateApplied          = query("migrate_applied")
	qMigrateForeign          = query("migrate_foreign")
	qMigrateRecord           = query("migrate_record")
)
