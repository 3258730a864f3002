/*-------------------------------------------------------------------------
 *
 * attach.h
 *	  Attached outbox tables: an application's own outbox table whose new
 *	  rows are published through cqrs_enqueue_event() by a trigger,
 *	  cqrs_outbox_attached(), created by cqrs_attach_outbox().  SQL entry
 *	  points only.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_ATTACH_H
#define CQRS_ATTACH_H

#include "fmgr.h"

extern Datum cqrs_outbox_attached(PG_FUNCTION_ARGS);
extern Datum cqrs_attached_outbox_enqueue(PG_FUNCTION_ARGS);

#endif							/* CQRS_ATTACH_H */
