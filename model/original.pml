/*
 * The seed's ORIGINAL design (/work/shared/seed/wave-coordination-design.md, "Root Cause
 * Analysis"), before its fixes A-E; model/README.md explains the mapping.
 *
 * - BatchJobCompletedListener->handle reads the parent completion percentage BEFORE the
 *   transaction that records the batch's completion commits; derived batches are upserted
 *   progressively (pending) in that transaction; only if the percentage read reached the
 *   threshold does it set derived_lines_ready and wave_monitoring_active (cache only).
 * - The listener's checkAndTriggerNextWave returns early when wave_monitoring_active is off.
 * - WaveCoordinator->checkAndTriggerNextWave marks the job completed and clears
 *   wave_monitoring_active as soon as the main waves are done, without looking at derived
 *   batches; it dispatches derived batches only when derived_lines_ready is in the cache.
 * - The timer nudges the coordinator only while wave_monitoring_active is on.
 *
 * Same instance as protocol.pml: parent batches 0, 1; derived batches 2 (of 0), 3 (of 1);
 * two workers; threshold 100 (config('waves.completion_threshold', 100)). No faults at all.
 *
 * Build switch: NO_COMPLETION_ASSERT drops the "completed while derived pending" assertion so
 * that the search goes on to the stuck final state (the liveness counterexample).
 */

#define NP 2
#define NB 4
#define PAR 2
#define THR 100
#define CHILD(p) ((p) + NP)

#define NONE 0
#define PENDING 1
#define DISPATCHED 2
#define COMPLETED 4
#define RUNNING 1
#define JCOMPLETED 2

mtype = { worker_finishes, listener_reads_percent, listener_commits, derived_initialized,
          listener_skips, tick, tick_skips, coord_completes_job, coord_dispatches,
          coord_nothing };

#define SAY(n) printf("@%d %e\n", _pid, n)
#define SAYB(n, b) printf("@%d %e batch=%d\n", _pid, n, b)

byte st[NB];
byte job = RUNNING;
bit lock;
bit mon = 1;            /* Cache wave_monitoring_active_{jobId} */
bit ready;              /* Cache derived_lines_ready_{jobId}: no DB fallback */
chan launchq = [4] of { byte };
chan events = [4] of { byte };

#define PARENTS_DONE ((st[0] == COMPLETED) + (st[1] == COMPLETED))
#define DERIVED_UNFINISHED ((st[2] != NONE && st[2] != COMPLETED) || (st[3] != NONE && st[3] != COMPLETED))
#define DERIVED_DONE (st[2] == COMPLETED && st[3] == COMPLETED)

/* WaveCoordinator->checkAndTriggerNextWave, original */
inline coordinator_run() {
  atomic {
    lock == 0 -> lock = 1;
    if
    :: job == JCOMPLETED -> SAY(coord_nothing)
    :: job != JCOMPLETED && st[0] == COMPLETED && st[1] == COMPLETED ->
       /* final main wave done: complete the job, clear monitoring; derived never looked at */
#ifndef NO_COMPLETION_ASSERT
       assert(!DERIVED_UNFINISHED);
#endif
       job = JCOMPLETED; mon = 0;
       printf("@%d %e and clears wave_monitoring_active (derived batches pending: %d)\n", _pid,
              coord_completes_job, (st[2] == PENDING) + (st[3] == PENDING))
    :: else ->
       n = PAR - ((st[0] == DISPATCHED) + (st[1] == DISPATCHED) + (st[2] == DISPATCHED) + (st[3] == DISPATCHED));
       i = 0;
       do
       :: i < NB && n > 0 ->
          if
          :: st[i] == PENDING && (i < NP || ready) ->
             st[i] = DISPATCHED; launchq!i; n--; d++;
             printf("@%d %e batch=%d\n", _pid, coord_dispatches, i)
          :: else
          fi;
          i++
       :: else -> break
       od;
       if :: d == 0 -> SAY(coord_nothing) :: else fi;
       i = 0; n = 0; d = 0
    fi;
    lock = 0
  }
}

proctype Worker() {
  byte b;
end_worker:
  do
  :: atomic { launchq?b -> SAYB(worker_finishes, b); events!b; b = 0 }
  od
}

/* BatchJobCompletedListener->handle, original */
active proctype Listener() {
  byte b, pct, i, n, d;
end_listener:
  do
  :: atomic { events?b ->
       /* derived-init gating: parent completion read before the completion transaction */
       pct = PARENTS_DONE * 100 / NP;
       printf("@%d %e batch=%d percent=%d\n", _pid, listener_reads_percent, b, pct) };
     atomic {
       /* the transaction: record the completion, upsert the parent's derived batch (pending) */
       st[b] = COMPLETED;
       if :: b < NP && st[CHILD(b)] == NONE -> st[CHILD(b)] = PENDING :: else fi;
       printf("@%d %e batch=%d\n", _pid, listener_commits, b) };
     atomic {
       if
       :: b < NP && pct >= THR -> ready = 1; mon = 1; SAY(derived_initialized)
       :: else
       fi;
       b = 0; pct = 0 };
     if
     :: mon -> coordinator_run()
     :: else -> SAY(listener_skips)
     fi
  od
}

/* the scheduled tick: only while monitoring is on */
active proctype Timer() {
  byte i, n, d;
end_timer:
  do
  :: job == RUNNING ->
     if
     :: mon -> SAY(tick); coordinator_run()
     :: else -> SAY(tick_skips)   /* stays quiet from now on */
     fi
  od
}

init {
  atomic { st[0] = PENDING; st[1] = PENDING; run Worker(); run Worker() }
}

/* the derived batches are eventually processed */
ltl derived_done { <> (st[2] == COMPLETED && st[3] == COMPLETED) }
