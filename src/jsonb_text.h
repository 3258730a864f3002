/*-------------------------------------------------------------------------
 *
 * jsonb_text.h
 *	  The text of a jsonb value, as jsonb's output function writes it.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_JSONB_TEXT_H
#define CQRS_JSONB_TEXT_H

#include "utils/jsonb.h"

extern char *cqrs_jsonb_text(Jsonb *jb, int *len);

#endif							/* CQRS_JSONB_TEXT_H */
