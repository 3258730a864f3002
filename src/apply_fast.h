/*-------------------------------------------------------------------------
 *
 * apply_fast.h
 *	  cqrs_upsert()'s update of an existing row without a statement.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_APPLY_FAST_H
#define CQRS_APPLY_FAST_H

#include "apply_cache.h"

extern int	apply_fast_update(ApplyTarget *t, int ncols, const int *colidx,
							  const Datum *values, const char *nulls,
							  const Datum *keyvals, int64 version);

#endif							/* CQRS_APPLY_FAST_H */
