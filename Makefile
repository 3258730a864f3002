# cqrs_sync -- PGXS build.  The version lives in cqrs_sync.control only.

EXTENSION   = cqrs_sync
EXTVERSION  = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" $(EXTENSION).control)

MODULE_big  = cqrs_sync
OBJS        = src/cqrs_sync.o src/shmem.o src/enqueue.o src/kafka.o \
              src/relay_worker.o src/relay_pipeline.o src/relay_order.o src/relay_record.o \
              src/topics.o src/monitor_worker.o src/dlt_depth.o src/stats.o src/util.o \
              src/apply.o src/apply_acl.o src/apply_cache.o src/apply_json.o src/apply_plans.o src/apply_fast.o \
              src/cleanup_worker.o src/cleanup_stats.o src/attach.o \
              src/sink_catalog.o src/sink_apply.o src/sink_route.o src/sink_worker.o src/sink_stats.o \
              src/event_id.o src/jsonb_text.o

DATA        = $(wildcard sql/cqrs_sync--*.sql)
# (no DOCS: PGXS would install README.md into the directory every extension
# shares, where another package's README.md clashes with it; the Debian
# package installs it under its own name, debian/rules)

# pg_regress (PG15) reads ./sql/<test>.sql and ./expected/<test>.out
REGRESS        = outbox operator apply cleanup monitoring attach
REGRESS_OPTS   = --inputdir=.
CONTRIB_TESTDB = cqrs_regress

ISOLATION        = apply_concurrency apply_races cleanup_inflight
ISOLATION_OPTS   = --inputdir=test/isolation
ISOLATION_TESTDB = cqrs_isolation

SHLIB_LINK  = -lrdkafka
PG_CPPFLAGS = -Isrc -Wall -Wextra -Werror -Wno-unused-parameter \
              -Wno-missing-field-initializers -Wno-sign-compare

PG_CONFIG  ?= pg_config
PGXS       := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Rebuild objects when a header they include changes (Debian's PostgreSQL is
# not configured with --enable-depend, so PGXS does not track this).
# (Each compile writes its own list, src/x.o.d or src/x.bc.d; CFLAGS and
# BITCODE_CFLAGS are expanded per target, so $@ is the object.)
override CFLAGS += -MMD -MP -MF $@.d
override BITCODE_CFLAGS += -MMD -MP -MF $@.d
-include $(OBJS:.o=.o.d) $(OBJS:.o=.bc.d)
EXTRA_CLEAN += $(OBJS:.o=.o.d) $(OBJS:.o=.bc.d)

.PHONY: e2e pgtap bench demo test dist

# The release archive PGXN takes: every committed file under
# cqrs_sync-<version>/, as a zip (git archive: nothing untracked, nothing
# from .git or tmp_check; .gitattributes leaves out the CI's own files).
# META.json's version must equal the control file's (test/release/check.sh).
DISTNAME = $(EXTENSION)-$(EXTVERSION)
EXTRA_CLEAN += $(DISTNAME).zip

dist:
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || \
		{ echo "make dist: builds the archive with git archive, and this tree is not a git checkout" >&2; exit 1; }
	git archive --format=zip --prefix=$(DISTNAME)/ -o $(DISTNAME).zip HEAD
	@echo "$(DISTNAME).zip"

# pgTAP behaviour tests against the running throwaway cluster (PGPORT/PGHOST).
pgtap:
	pg_prove --ext .sql -d cqrs_pgtap test/pgtap/

# End-to-end TAP tests: real throwaway clusters and the real Kafka broker.
e2e:
	PG_CONFIG=$(PG_CONFIG) test/e2e.sh

bench:
	test/bench/run.sh
	test/bench/sink_bench.sh

demo:
	test/demo.sh

test:
	test/run.sh
