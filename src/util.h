/*-------------------------------------------------------------------------
 *
 * util.h
 *	  Catalog look-ups shared by the parts of cqrs_sync.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_UTIL_H
#define CQRS_UTIL_H

#include "access/tupdesc.h"
#include "executor/spi.h"

#define CQRS_ALERT_CHANNEL "cqrs_sync_alert"

extern Oid	cqrs_extension_namespace(Oid ext_oid);
extern char *cqrs_extension_schema(Oid ext_oid);
extern void cqrs_check_row_layout(const char *function, TupleDesc desc, int ncols);
extern ErrorData *cqrs_catch_and_abort(MemoryContext cxt);
extern ErrorData *cqrs_report_and_abort(MemoryContext cxt);
extern SPIPlanPtr cqrs_keep_plan(const char *sql, int nargs, Oid *argtypes);
extern void cqrs_notify_alert(const char *worker, const char *payload);
extern void cqrs_register_worker(const char *function, const char *type,
								 int restart_seconds);

#endif							/* CQRS_UTIL_H */
