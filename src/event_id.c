/*-------------------------------------------------------------------------
 *
 * event_id.c
 *	  Time-ordered event ids: cqrs_uuidv7(), the default of
 *	  cqrs_outbox.event_id; and cqrs_uuid_text(), the event_id header's text.
 *
 * Every outbox row has an entry in the unique index on event_id, and the
 * relay's update of the row to SENT adds another one when it cannot be a
 * HOT update (its page is full).  With random (version 4) UUIDs each of
 * those insertions lands on a random leaf page of that index; with a
 * backlog or a long retention most of them touch a page no other recent
 * insertion touched.  A version 7 UUID (RFC 9562) begins with the time, so
 * the entries of recent rows sit together at the index's right edge, as
 * the ids' entries do in the primary key.
 *
 * Layout: 48 bits of Unix time in milliseconds, the version (7), 12 bits of
 * sub-millisecond time (RFC 9562 section 6.2, method 3), the variant (10),
 * and 62 random bits.  Within one session the values strictly increase,
 * also when the clock steps back or two are made within 1/4096 ms.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "datatype/timestamp.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "event_id.h"

PG_FUNCTION_INFO_V1(cqrs_uuidv7);

/* The last time step handed out: Unix milliseconds << 12 | sub-ms fraction. */
static uint64 last_step = 0;

Datum
cqrs_uuidv7(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *uuid = palloc(sizeof(pg_uuid_t));
	int64		unix_us;
	uint64		step;
	uint64		ms;
	int			sub;

	unix_us = GetCurrentTimestamp() +
		(int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
	step = ((uint64) (unix_us / 1000) << 12) |
		(uint64) ((unix_us % 1000) * 4096 / 1000);
	if (step <= last_step)
		step = last_step + 1;
	last_step = step;
	ms = step >> 12;
	sub = (int) (step & 0xFFF);

	if (!pg_strong_random(&uuid->data[8], 8))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values")));
	uuid->data[0] = (unsigned char) (ms >> 40);
	uuid->data[1] = (unsigned char) (ms >> 32);
	uuid->data[2] = (unsigned char) (ms >> 24);
	uuid->data[3] = (unsigned char) (ms >> 16);
	uuid->data[4] = (unsigned char) (ms >> 8);
	uuid->data[5] = (unsigned char) ms;
	uuid->data[6] = (unsigned char) (0x70 | (sub >> 8));
	uuid->data[7] = (unsigned char) (sub & 0xFF);
	uuid->data[8] = (unsigned char) ((uuid->data[8] & 0x3F) | 0x80);

	PG_RETURN_UUID_P(uuid);
}

/*
 * The text of a uuid as uuid_out writes it (lower-case hex, dashes after
 * bytes 4, 6, 8 and 10), palloc'd; without uuid_out's StringInfo appended
 * one character at a time, for every row the relay claims.
 */
char *
cqrs_uuid_text(const pg_uuid_t *uuid)
{
	static const int groups[] = {4, 2, 2, 2, 6};
	const char *src = (const char *) uuid->data;
	char	   *out = palloc(UUID_LEN * 2 + 5);
	char	   *p = out;

	for (int g = 0; g < lengthof(groups); g++)
	{
		if (g > 0)
			*p++ = '-';
		p += hex_encode(src, groups[g], p);
		src += groups[g];
	}
	*p = '\0';
	return out;
}
