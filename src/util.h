/*-------------------------------------------------------------------------
 *
 * util.h
 *	  Catalog look-ups shared by the parts of cqrs_sync.
 *
 *-------------------------------------------------------------------------
 */
#ifndef CQRS_UTIL_H
#define CQRS_UTIL_H

extern char *cqrs_extension_schema(Oid ext_oid);

#endif							/* CQRS_UTIL_H */
