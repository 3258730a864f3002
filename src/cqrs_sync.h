/*-------------------------------------------------------------------------
 *
 * cqrs_sync.h
 *	  Settings (GUCs) shared by the parts of cqrs_sync.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_SYNC_H
#define CQRS_SYNC_H

/* Settings, defined in cqrs_sync.c */
extern char *cqrs_database;
extern char *cqrs_brokers;
extern char *cqrs_kafka_config_file;
extern char *cqrs_dlt_suffix;
extern int	cqrs_max_retries;
extern int	cqrs_batch_size;
extern int	cqrs_poll_interval_ms;
extern int	cqrs_linger_ms;
extern int	cqrs_retry_backoff_ms;
extern bool cqrs_relay_enabled;
extern bool cqrs_delete_on_sent;
extern int	cqrs_dlt_depth_interval_ms;
extern char *cqrs_read_side_dlt_topics;

#endif							/* CQRS_SYNC_H */
