/*-------------------------------------------------------------------------
 *
 * dlt_depth.h
 *	  How many messages each dead-letter topic holds, asked of Kafka by the
 *	  monitor worker and published in shared memory for the cqrs_dlt_depth
 *	  view, and how fresh that is (cqrs_stats_dlt_depth).
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_DLT_DEPTH_H
#define CQRS_DLT_DEPTH_H

#include <librdkafka/rdkafka.h>

#include "nodes/pg_list.h"

extern void cqrs_dlt_depth_refresh(rd_kafka_t *rk, List *topics, List *required);
extern void cqrs_dlt_depth_failed(const char *error);

#endif							/* CQRS_DLT_DEPTH_H */
