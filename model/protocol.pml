/*
 * importwaves: the wave coordination protocol as the code on main does it (model/README.md maps
 * every process and transition to its file and function).
 *
 * Instance: one main wave with two parent batches (0, 1), one derived wave whose batches (2, 3)
 * are created for parent 0 and parent 1 once each has completed, two workers, parallelism 2,
 * completion threshold 100 or 50 (chosen by init, so one run covers both).
 *
 * Faults (each costs one unit of FAULTS, so that "once faults stop" is a finite prefix): a worker
 * fails, dies mid-batch or stalls and comes back late with its old fencing token; a pod never
 * starts; a worker exits 0 without doing its work; a completion notice is lost or delivered again;
 * a worker is slow to claim its dispatch; the coordinator is killed at any step of a run; Redis
 * loses its flags. Time passing (a batch no live worker holds looks stale) is not a fault.
 *
 * Build switches: MAX_ATTEMPTS, FAULTS, RETRIES (retry-failed commands), THR (fix the threshold),
 * and the three known-bad mutants MUTANT_NO_GUARD, MUTANT_PRECOMMIT, MUTANT_STALE_TOKEN.
 */

#ifndef MAX_ATTEMPTS
#define MAX_ATTEMPTS 2
#endif
#ifndef FAULTS
#define FAULTS 2
#endif
#ifndef RETRIES
#define RETRIES 0
#endif
#ifndef CRASHES
#define CRASHES 0   /* coordinator deaths on top of FAULTS */
#endif

#define PAR 2       /* spec.parallelism */
#define NP 2        /* parent batches: 0, 1 */
#define NB 4        /* + derived batches: 2 (child of 0), 3 (child of 1) */
#define CHILD(p) ((p) + NP)
#define WAVE(b) ((b) >= NP)

/* wave_batches.status (NONE: a derived batch not created yet) */
#define NONE 0
#define PENDING 1
#define DISPATCHED 2
#define PROCESSING 3
#define COMPLETED 4
#define FAILED 5
/* import_jobs.status */
#define RUNNING 1
#define JCOMPLETED 2
#define JFAILED 3
/* what a worker's end tells the listener: exit 0 (or its NOTIFY), exit 1 */
#define EXIT0 1
#define EXIT1 2

/* @rules: the stimuli; the rules of tests/property/test_guard_rules.py carry these names
   (tests/unit/test_model_transitions.py fails when the two lists drift apart) */
mtype = { worker_runs, concurrent_completions, completions_out_of_order, redeliver, tick,
          reconcile, retry_failed, time_passes, coordinator_dies, redis_fault };
/* @steps: the other transitions (README.md maps each to the code) */
mtype = { worker_claims, worker_completes, worker_fenced, worker_fails, worker_dies,
          worker_stalls, worker_late, worker_not_claimed, worker_never_started,
          worker_exit0_nowork, notice_lost, listener_nudged, attempt_failed, coord_lock,
          coord_create_derived, coord_snapshot_decide, coord_dispatch, coord_commit,
          coord_launch, coord_flags, adopt, slow_claim };
/* where a coordinator run can be killed */
mtype = { after_creating, after_deciding, after_dispatching, after_committing };

#define SAY(n) printf("@%d %e\n", _pid, n)
#define SAYB(n, b, s) printf("@%d %e batch=%d token=%d\n", _pid, n, b, s)

/* -- the tenant database ------------------------------------------------------------------ */
byte st[NB];            /* status */
byte seq[NB];           /* dispatch_seq: the fencing token */
byte att[NB];           /* attempts */
bit needs[NP];          /* needs_derivation of the parent batches */
byte cnt[12];           /* wave_coordination counters, [wave * 6 + status], kept by the triggers */
byte job = RUNNING;
bit lock;               /* the job row lock (job_lock ... FOR UPDATE) */
bit stale[NB];          /* heartbeat_at / dispatched_at older than staleAfterSeconds */
/* -- Redis: hints with a TTL; nothing in the protocol reads them ------------------------------ */
bit mon = 1;            /* wave_monitoring_active */
bit ready;              /* derived_lines_ready */
/* -- the world ------------------------------------------------------------------------------ */
byte thr;               /* completionThreshold */
byte faults = FAULTS;
byte retries = RETRIES;
byte crashes = CRASHES;
byte hs[NB];            /* token of the live worker on the batch's current dispatch (0: none) */
byte work[NB];          /* ghost: how many times the batch's work was committed */
chan launchq = [6] of { byte, byte };           /* launched (batch, token) */
chan notices = [6] of { byte, byte, byte, byte };  /* (exit, batch, token, parents done before commit) */

/* Every status change goes through the counter trigger (wave_counts_apply). */
inline set_status(b, s) {
  cnt[WAVE(b) * 6 + st[b]]--;
  cnt[WAVE(b) * 6 + s]++;
  st[b] = s
}

/* batch_fail: for the current dispatch only; an unclaimed dispatch counts its attempt */
inline batch_fail(b, s) {
  if
  :: (st[b] == DISPATCHED || st[b] == PROCESSING) && seq[b] == s ->
     if :: st[b] == DISPATCHED -> att[b]++ :: else -> skip fi;
     stale[b] = 0;
     if :: att[b] >= MAX_ATTEMPTS -> set_status(b, FAILED) :: else -> set_status(b, PENDING) fi;
     SAYB(attempt_failed, b, s)
  :: else -> skip
  fi
}

/* a completion notice (NOTIFY at the worker's commit / its exit code); it may be lost */
inline notice(k, b, s, pre) {
  if
  :: faults > 0 -> faults--; SAYB(notice_lost, b, s)
  :: true -> assert(len(notices) < 6); notices!k, b, s, pre
  fi
}
/* (always called inside an atomic sequence: the guard and the decrement are one step) */

#define PARENTS_DONE ((st[0] == COMPLETED) + (st[1] == COMPLETED))
#define GATE(pc) ((pc) * 100 >= thr * NP)
#define UNFINISHED_ROWS (cr != 0 || (st[2] != NONE && st[2] != COMPLETED) || (st[3] != NONE && st[3] != COMPLETED) || st[0] != COMPLETED || st[1] != COMPLETED)
#define ACTIVE (cnt[DISPATCHED] + cnt[PROCESSING] + cnt[6 + DISPATCHED] + cnt[6 + PROCESSING])

/* -- one coordinator run: check_and_trigger_next_wave ------------------------------------------ */
#define COORD_LOCALS byte cr, dm, dp, dd, js, pre, i, n, tk0, tk1, tk2, tk3; \
                     bit keep, gopen, vialistener, mine, defer, again

#define CRASH(where) \
  if \
  :: atomic { faults + crashes > 0 -> if :: crashes > 0 -> crashes-- :: else -> faults-- fi; \
              printf("@%d %e %e\n", _pid, coordinator_dies, where); goto crashed } \
  :: true -> skip \
  fi

/* derived.create_for_completed_parents: every completed parent batch without its derived
   batches, read from the database now, under the job lock (buffered in cr until the commit) */
inline create_derived() {
  i = 0;
  do
  :: i < NP -> if :: st[i] == COMPLETED && needs[i] -> cr = cr | (1 << i) :: else fi; i++
  :: else -> break
  od;
  i = 0
}

/* launch a worker for (batch, token); the run holds the dispatch (hs) from its commit on */
#define LAUNCH(b, t) assert(len(launchq) < 6); launchq!b, t

/* the flags after the commit: the listener's on_commit, set/clear monitoring, the DB fallback */
#define FLAGS \
    if :: vialistener && gopen -> ready = 1 :: else fi; \
    mon = keep; \
    if :: gopen && keep -> ready = 1 :: else fi; \
    printf("@%d %e monitoring %d, derived_ready %d\n", _pid, coord_flags, mon, ready)

/* a run that deferred its derived creation is followed at once by a second run that creates */
#define AGAIN if :: defer -> again = 1 :: else fi

#define RESET \
    cr = 0; dm = 0; dp = 0; dd = 0; js = 0; keep = 0; gopen = 0; mine = 0; pre = 0; \
    vialistener = 0; tk0 = 0; tk1 = 0; tk2 = 0; tk3 = 0; i = 0; n = 0; defer = 0; goto finished

inline coordinator_run() {
  do  /* once, or twice when the first run deferred its derived creation (`again`) */
  ::
  /* job_lock, then the derived batches of completed parents (the catch-up) */
  atomic { lock == 0 -> lock = 1; mine = 1; SAY(coord_lock);
#ifndef MUTANT_PRECOMMIT
    /* decide.derivation on the snapshot before creating: AFTER_DISPATCH when a parent awaits
       derivation and the decision already dispatches derived batches (the gate open, earlier
       ones pending, a slot free): no creation in this run; a second run right after its commit
       creates (`again`). (AT_THRESHOLD needs more pending derived batches than this instance
       has before its gate opens: it never applies here.) */
    i = (st[0] == COMPLETED && needs[0]) || (st[1] == COMPLETED && needs[1]);
    tk0 = PAR - ACTIVE;
    if
    :: cnt[COMPLETED] < NP && cnt[PENDING] > 0 && tk0 > 0 ->
       tk0 = tk0 - (cnt[PENDING] < tk0 -> cnt[PENDING] : tk0)
    :: else
    fi;
    if
    :: !again && job != JCOMPLETED && i && tk0 > 0 && cnt[6 + PENDING] > 0 && GATE(cnt[COMPLETED]) ->
       defer = 1
    :: else -> create_derived()
    fi;
    again = 0; i = 0; tk0 = 0;
    printf("@%d %e for parent mask %d (deferred %d)\n", _pid, coord_create_derived, cr, defer)
#else
    /* MUTANT: derived batches are created only by the listener, and only when the parent
       completion it read BEFORE the completing transaction committed reached the threshold;
       no catch-up from the database */
    if :: vialistener && GATE(pre) -> create_derived() :: else fi;
    printf("@%d %e for parent mask %d (parents done before the commit: %d)\n", _pid,
           coord_create_derived, cr, pre)
#endif
  };
  CRASH(after_creating);
  atomic {
    /* read_snapshot: the counters (one statement) plus this transaction's own creations */
    n = (cr & 1) + ((cr >> 1) & 1);                    /* derived batches created in this run */
    i = 0;                                              /* awaiting_derivation */
#ifndef MUTANT_PRECOMMIT
    if :: st[0] == COMPLETED && needs[0] && !(cr & 1) -> i++ :: else fi;
    if :: st[1] == COMPLETED && needs[1] && !(cr & 2) -> i++ :: else fi;
    if :: i > 0 && !defer -> create_derived(); n = (cr & 1) + ((cr >> 1) & 1); i = 0 :: else fi;
#else
    if :: st[0] == COMPLETED && needs[0] && !(cr & 1) -> i++ :: else fi;
    if :: st[1] == COMPLETED && needs[1] && !(cr & 2) -> i++ :: else fi;
#endif
    /* decide */
    js = job; keep = 1; dp = 0; dd = 0;
    gopen = GATE(cnt[COMPLETED]);
    if
    :: job == JCOMPLETED -> keep = 0
    :: else ->
       tk0 = PAR - ACTIVE;
       if
       :: cnt[COMPLETED] < NP && cnt[PENDING] > 0 && tk0 > 0 ->
          dp = (cnt[PENDING] < tk0 -> cnt[PENDING] : tk0); tk0 = tk0 - dp
       :: else
       fi;
       tk1 = cnt[6 + PENDING] + n;
       if
       :: tk0 > 0 && tk1 > 0 && gopen -> dd = (tk1 < tk0 -> tk1 : tk0)
       :: else
       fi;
#ifndef MUTANT_NO_GUARD
       /* the completion guard: main waves done, every derived batch completed, every parent
          completed (no more derived batches can appear), none awaiting derivation */
       if
       :: cnt[COMPLETED] == NP && cnt[6 + COMPLETED] == 2 - cnt[6 + NONE] + n && i == 0 ->
          js = JCOMPLETED; keep = 0
#else
       /* MUTANT: the seed's original rule, main waves done = job done */
       if
       :: cnt[COMPLETED] == NP ->
          js = JCOMPLETED; keep = 0
#endif
       :: else ->
          if
          :: cnt[FAILED] + cnt[6 + FAILED] > 0 && dp + dd == 0 && ACTIVE == 0 ->
             js = JFAILED; keep = 0
          :: else -> js = RUNNING
          fi
       fi
    fi;
#ifndef MUTANT_NO_GUARD
    /* _verify_completion: a fresh look at the batch rows, in this transaction */
    if
    :: js == JCOMPLETED && job != JCOMPLETED ->
       if
       :: UNFINISHED_ROWS -> js = RUNNING; keep = 1
       :: else
       fi
    :: else
    fi;
#endif
    printf("@%d %e job %d -> %d, dispatch %d parent(s) %d derived, gate open %d\n",
           _pid, coord_snapshot_decide, job, js, dp, dd, gopen);
    tk0 = 0; tk1 = 0; i = 0; n = 0;
    /* nothing to write: the rest of the run is the commit of nothing and the flags */
    if
    :: cr == 0 && dp + dd == 0 && js == job ->
       lock = 0; mine = 0; FLAGS; AGAIN; RESET
    :: else
    fi
  };
  CRASH(after_deciding);
  /* batches_dispatch: pending rows now, in id order (FOR UPDATE SKIP LOCKED) */
  d_step {
    i = 0;
    do
    :: i < NP && dp > 0 -> if :: st[i] == PENDING -> dm = dm | (1 << i); dp-- :: else fi; i++
    :: else -> break
    od;
    i = NP;
    do
    :: i < NB && dd > 0 ->
       if
       :: st[i] == PENDING || (st[i] == NONE && (cr & (1 << (i - NP)))) ->
          /* a derived batch is dispatched only past its parents' threshold, its parent done */
          assert(GATE(PARENTS_DONE) && st[i - NP] == COMPLETED);
          dm = dm | (1 << i); dd--
       :: else
       fi;
       i++
    :: else -> break
    od;
    printf("@%d %e batch mask %d\n", _pid, coord_dispatch, dm);
    i = 0; dp = 0; dd = 0
  };
  CRASH(after_dispatching);
  /* the commit: every write of the run at once, then the job lock is released */
progress_commit:
  d_step {
    i = 0;
    do
    :: i < NP ->
       if :: cr & (1 << i) -> set_status(CHILD(i), PENDING); needs[i] = 0 :: else fi; i++
    :: else -> break
    od;
    i = 0;
    do
    :: i < NB ->
       if
       :: dm & (1 << i) -> set_status(i, DISPATCHED); seq[i]++; stale[i] = 0; hs[i] = seq[i]
       :: else
       fi;
       i++
    :: else -> break
    od;
    i = 0;
    tk0 = seq[0]; tk1 = seq[1]; tk2 = seq[2]; tk3 = seq[3];
    job = js;
    lock = 0; mine = 0;
    printf("@%d %e job %d, dispatched batch mask %d, tokens %d %d %d %d\n",
           _pid, coord_commit, job, dm, seq[0], seq[1], seq[2], seq[3]);
    cr = 0
  };
  CRASH(after_committing);
  /* launch workers (after the commit) */
  atomic {
    if :: dm & 1 -> LAUNCH(0, tk0) :: else fi;
    if :: dm & 2 -> LAUNCH(1, tk1) :: else fi;
    if :: dm & 4 -> LAUNCH(2, tk2) :: else fi;
    if :: dm & 8 -> LAUNCH(3, tk3) :: else fi;
    if :: dm -> printf("@%d %e batch mask %d\n", _pid, coord_launch, dm) :: else fi;
    dm = 0; tk0 = 0; tk1 = 0; tk2 = 0; tk3 = 0;
    FLAGS;
    AGAIN;
    RESET
  };
crashed:
  /* a connection that dies rolls its transaction back and releases the job lock; after the
     commit, the dispatched batches are left without a worker */
  atomic {
    if :: mine -> lock = 0 :: else fi;
    if :: (dm & 1) && hs[0] == tk0 -> hs[0] = 0 :: else fi;
    if :: (dm & 2) && hs[1] == tk1 -> hs[1] = 0 :: else fi;
    if :: (dm & 4) && hs[2] == tk2 -> hs[2] = 0 :: else fi;
    if :: (dm & 8) && hs[3] == tk3 -> hs[3] = 0 :: else fi;
    RESET
  };
finished:
  if :: again -> skip :: else -> break fi
  od
}

/* -- processes ------------------------------------------------------------------------------ */

/* the worker process ends: it no longer holds its dispatch */
#define WEND if :: hs[b] == s -> hs[b] = 0 :: else fi; b = 0; s = 0; pre = 0; ok = 0; claimed = 0

/* The reference worker (worker.py run_batch): claim, then one fenced transaction that imports
   the rows and records the completion (its NOTIFY is delivered at that commit). */
inline worker_complete(b, s) {
  atomic {
    if
#ifndef MUTANT_STALE_TOKEN
    :: st[b] == PROCESSING && seq[b] == s ->
#else
    /* MUTANT: the completion is not fenced by the dispatch sequence */
    :: st[b] == PROCESSING ->
#endif
       if
       :: lock -> SAYB(concurrent_completions, b, s)   /* while a run holds the job lock */
       :: else -> SAYB(worker_completes, b, s)
       fi;
       assert(seq[b] == s);     /* fencing: only the batch's current dispatch records its work */
       pre = PARENTS_DONE;      /* what a reader before this commit would see */
       work[b]++;
       set_status(b, COMPLETED);
       ok = 1
    :: else -> SAYB(worker_fenced, b, s)   /* exit 3: nothing to report */
    fi;
    if :: ok -> notice(EXIT0, b, s, pre) :: else fi;
    WEND
  }
}

proctype Worker() {
  byte b, s, pre; bit ok, claimed;
end_worker:
  do
  :: atomic { launchq?b, s ->
progress_worker:
       SAYB(worker_runs, b, s);
       if
       :: st[b] == DISPATCHED && seq[b] == s ->
          SAYB(worker_claims, b, s); set_status(b, PROCESSING); att[b]++; stale[b] = 0; claimed = 1
       :: !(st[b] == DISPATCHED && seq[b] == s) ->
          /* batch_claim found nothing: exit 0 if already completed, else 3 (fenced) */
          SAYB(worker_not_claimed, b, s);
          if :: st[b] == COMPLETED -> notice(EXIT0, b, s, 0) :: else fi; WEND
       :: faults > 0 -> faults--; SAYB(worker_never_started, b, s); notice(EXIT1, b, s, 0); WEND
       :: faults > 0 -> faults--; SAYB(worker_exit0_nowork, b, s); notice(EXIT0, b, s, 0); WEND
       fi };
     if
     :: claimed ->
        if
        :: true -> worker_complete(b, s)
        :: atomic { faults > 0 -> faults--; SAYB(worker_fails, b, s); batch_fail(b, s);
                    notice(EXIT1, b, s, 0); WEND }
        :: atomic { faults > 0 ->   /* killed mid-batch (node lost): no exit code reaches anyone */
                    faults--; SAYB(worker_dies, b, s); WEND }
        :: atomic { faults > 0 ->   /* stops (heartbeat too), comes back late with its old token */
                    faults--; SAYB(worker_stalls, b, s); if :: hs[b] == s -> hs[b] = 0 :: else fi };
           if
           :: true -> worker_complete(b, s)
           :: atomic { SAYB(worker_late, b, s); batch_fail(b, s); notice(EXIT1, b, s, 0); WEND }
           fi
        fi
     :: else
     fi
  od
}

/* The batch-completed listener (engine/listener.py): a notice is a prompt; it never records a
   completion. Exit 0 without a recorded completion counts a failed attempt; exit 1 records the
   failure (both fenced by the token); then one coordinator run. */
active proctype Listener() {
  COORD_LOCALS;
  byte k, b, s, k2, b2, s2, p2;
end_listener:
  do
  :: atomic { nempty(notices) ->
       if
       :: notices?k, b, s, pre -> SAYB(listener_nudged, b, s)
       :: faults > 0 && len(notices) >= 2 -> faults--;
          notices?k2, b2, s2, p2; notices?k, b, s, pre; notices!k2, b2, s2, p2;
          k2 = 0; b2 = 0; s2 = 0; p2 = 0;
          SAYB(completions_out_of_order, b, s)
       fi;
       if
       :: k == EXIT0 && st[b] != COMPLETED -> batch_fail(b, s)
       :: k == EXIT1 -> batch_fail(b, s)
       :: else
       fi;
       /* the same notice may come again later (its token stale by then) */
       if
       :: faults > 0 -> faults--; SAYB(redeliver, b, s); assert(len(notices) < 6); notices!k, b, s, pre
       :: true
       fi;
       k = 0; b = 0; s = 0; vialistener = 1 };
     coordinator_run()
  od
}

/* The timer (runner.py _loop): a tick is a coordinator run followed by adopt_dispatched; when
   a batch looks stale, the sweep (recovery.py reconcile) comes first. */
active proctype Timer() {
  COORD_LOCALS;
end_timer:
  do
  :: job == RUNNING ->
     if
     :: atomic { lock == 0 && ((stale[0] && (st[0] == DISPATCHED || st[0] == PROCESSING))
                            || (stale[1] && (st[1] == DISPATCHED || st[1] == PROCESSING))
                            || (stale[2] && (st[2] == DISPATCHED || st[2] == PROCESSING))
                            || (stale[3] && (st[3] == DISPATCHED || st[3] == PROCESSING))) ->
          /* batches_demote_stale_processing, batches_requeue_stuck_dispatched */
          i = 0;
          do
          :: i < NB ->
             if
             :: stale[i] && st[i] == PROCESSING ->
                if :: att[i] >= MAX_ATTEMPTS -> set_status(i, FAILED) :: else -> set_status(i, PENDING) fi
             :: stale[i] && st[i] == DISPATCHED ->
                att[i]++;
                if :: att[i] >= MAX_ATTEMPTS -> set_status(i, FAILED) :: else -> set_status(i, PENDING) fi
             :: else
             fi;
             stale[i] = 0; i++
          :: else -> break
          od;
          i = 0;
          mon = 1;
          printf("@%d %e statuses %d %d %d %d\n", _pid, reconcile, st[0], st[1], st[2], st[3]) }
     :: else -> SAY(tick)
     fi;
     coordinator_run();
     /* adopt_dispatched: a dispatched batch no live worker holds gets a new token and a worker */
     atomic {
       i = 0;
       do
       :: i < NB ->
          if
          :: st[i] == DISPATCHED && hs[i] != seq[i] ->
             /* batch_redispatch: a new token, dispatched_at now (not stale any more) */
             seq[i]++; hs[i] = seq[i]; stale[i] = 0; assert(len(launchq) < 6); launchq!i, seq[i];
             printf("@%d %e batch=%d token=%d\n", _pid, adopt, i, seq[i])
          :: else
          fi;
          i++
       :: else -> break
       od;
       i = 0 }
  od
}

/* Time, Redis and the user. */
#define CAN_AGE(b) ((st[b] == DISPATCHED || st[b] == PROCESSING) && !stale[b] && hs[b] != seq[b])
#define SLOW(b) (st[b] == DISPATCHED && !stale[b] && hs[b] == seq[b])
active proctype Env() {
  byte i;
end_env:
  do
  :: atomic { CAN_AGE(0) -> stale[0] = 1; SAYB(time_passes, 0, seq[0]) }
  :: atomic { CAN_AGE(1) -> stale[1] = 1; SAYB(time_passes, 1, seq[1]) }
  :: atomic { CAN_AGE(2) -> stale[2] = 1; SAYB(time_passes, 2, seq[2]) }
  :: atomic { CAN_AGE(3) -> stale[3] = 1; SAYB(time_passes, 3, seq[3]) }
  /* a live worker slow to claim its dispatch: it looks stale too (a fault) */
  :: atomic { faults > 0 && SLOW(0) -> faults--; stale[0] = 1; SAYB(slow_claim, 0, seq[0]) }
  :: atomic { faults > 0 && SLOW(1) -> faults--; stale[1] = 1; SAYB(slow_claim, 1, seq[1]) }
  :: atomic { faults > 0 && SLOW(2) -> faults--; stale[2] = 1; SAYB(slow_claim, 2, seq[2]) }
  :: atomic { faults > 0 && SLOW(3) -> faults--; stale[3] = 1; SAYB(slow_claim, 3, seq[3]) }
  :: atomic { faults > 0 && (mon || ready) -> faults--; mon = 0; ready = 0; SAY(redis_fault) }
  :: retries > 0 && job == JFAILED ->
     /* recovery.py retry_failed: failed batches back to pending with fresh attempts, the job
        running; its coordinator run is the Timer's next one (the job is running again) */
     atomic { lock == 0 -> retries--;
       i = 0;
       do
       :: i < NB -> if :: st[i] == FAILED -> set_status(i, PENDING); att[i] = 0 :: else fi; i++
       :: else -> break
       od;
       i = 0; job = RUNNING; SAY(retry_failed) }
  od
}

/* The guard rules, checked in every state. */
#define N2(a, b, s) ((st[a] == s) + (st[b] == s))
#define WAVE_OK(w, a, b) (cnt[w * 6 + NONE] == N2(a, b, NONE) && cnt[w * 6 + PENDING] == N2(a, b, PENDING) \
  && cnt[w * 6 + DISPATCHED] == N2(a, b, DISPATCHED) && cnt[w * 6 + PROCESSING] == N2(a, b, PROCESSING) \
  && cnt[w * 6 + COMPLETED] == N2(a, b, COMPLETED) && cnt[w * 6 + FAILED] == N2(a, b, FAILED))
#define PROOF(b) (work[b] <= 1 && (st[b] != COMPLETED || work[b] == 1) && (work[b] == 0 || st[b] == COMPLETED))
#define ALL_COMPLETED (st[0] == COMPLETED && st[1] == COMPLETED && st[2] == COMPLETED && st[3] == COMPLETED)
#define ANY_FAILED (st[0] == FAILED || st[1] == FAILED || st[2] == FAILED || st[3] == FAILED)
#define INVARIANT ((job != JCOMPLETED || ALL_COMPLETED) \
  && (job != JFAILED || ANY_FAILED) \
  && PROOF(0) && PROOF(1) && PROOF(2) && PROOF(3) \
  && WAVE_OK(0, 0, 1) && WAVE_OK(1, 2, 3))

active proctype Monitor() {
end_monitor:
  atomic { thr != 0 && !INVARIANT -> assert(INVARIANT) }
}

init {
  atomic {
    if
#ifdef THR
    :: thr = THR
#else
    :: thr = 100
    :: thr = 50
#endif
    fi;
    st[0] = PENDING; st[1] = PENDING; needs[0] = 1; needs[1] = 1;
    cnt[PENDING] = 2; cnt[6 + NONE] = 2;
    run Worker(); run Worker()
  }
}

/* liveness, under weak fairness, once the finite faults are spent */
ltl done { <> (job == JCOMPLETED || job == JFAILED) }
ltl completes { <> (job == JCOMPLETED) }
