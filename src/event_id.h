/*-------------------------------------------------------------------------
 *
 * event_id.h
 *	  Event ids: their text form.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_EVENT_ID_H
#define CQRS_EVENT_ID_H

#include "utils/uuid.h"

extern char *cqrs_uuid_text(const pg_uuid_t *uuid);

#endif							/* CQRS_EVENT_ID_H */
