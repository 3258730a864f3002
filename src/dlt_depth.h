/*-------------------------------------------------------------------------
 *
 * dlt_depth.h
 *	  How many messages each dead-letter topic holds, asked of Kafka by the
 *	  relay and published in shared memory for the cqrs_dlt_depth view.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_DLT_DEPTH_H
#define CQRS_DLT_DEPTH_H

#include <librdkafka/rdkafka.h>

#include "nodes/pg_list.h"

extern void cqrs_dlt_depth_refresh(rd_kafka_t *rk, List *topics);

#endif							/* CQRS_DLT_DEPTH_H */
