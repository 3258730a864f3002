/*-------------------------------------------------------------------------
 *
 * mock_cluster.c
 *	  A librdkafka mock Kafka cluster for fault-injection tests, driven by
 *	  commands on stdin.  Test infrastructure only: not part of the
 *	  extension's build.  test/kafka/ctool.sh builds it into the test state
 *	  directory; CqrsTest::mock_cluster_start runs it.
 *
 *	  mock_cluster [-b BROKERS] [-t TOPIC:PARTITIONS[:REPLICATION]]... [-d]
 *
 *	  Brokers 1..BROKERS (default 1) listen on real TCP on 127.0.0.1 (random
 *	  ports).  The first line on stdout is the bootstrap servers list; then
 *	  every command line read from stdin gets exactly one answer line, "ok"
 *	  (sometimes followed by a value) or "error: <why>".  EOF on stdin or the
 *	  command "quit" destroys the cluster and exits 0.  -d turns on
 *	  librdkafka's "mock" debug context (on stderr).
 *
 *	  Commands (API is a Kafka request name such as Produce, InitProducerId,
 *	  Metadata, ListOffsets, or its number; ERR is a librdkafka error name
 *	  without the RD_KAFKA_RESP_ERR_ prefix, e.g. OUT_OF_ORDER_SEQUENCE_NUMBER
 *	  or _TRANSPORT, or its number; BROKER -1 means all brokers where noted):
 *
 *	  topic TOPIC PARTITIONS [REPLICATION]   create a topic
 *	  errors API ERR [ERR ...]       the next requests of API, on any broker,
 *	                                 fail with these errors, in this order
 *	                                 (_TRANSPORT: the broker disconnects)
 *	  broker-errors BROKER API ERR[@RTT_MS] [...]
 *	                                 the same on one broker, each answer
 *	                                 delayed by RTT_MS; takes precedence over
 *	                                 "errors"
 *	  pending BROKER API             "ok N": errors left in BROKER's stack
 *	  clear API                      drop the remaining "errors" for API
 *	  down BROKER|-1, up BROKER|-1   disconnect and refuse clients / accept
 *	                                 them again (no leader change)
 *	  rtt BROKER|-1 MS               delay every answer of the broker
 *	  rack BROKER|-1 RACK            rack reported in Metadata
 *	  leader TOPIC PARTITION BROKER|-1   move the leader (-1: leaderless)
 *	  follower TOPIC PARTITION BROKER    preferred replica for fetching
 *	  follower-wmarks TOPIC PARTITION LO HI
 *	  topic-error TOPIC ERR          Metadata reports ERR for the topic
 *	                                 (NO_ERROR to clear)
 *	  coordinator transaction|group KEY BROKER
 *	  apiversion API MIN MAX         ApiVersion range advertised (-1 -1:
 *	                                 the API is not offered)
 *	  bootstrap                      "ok HOST:PORT,..."
 *	  quit
 *
 *	  librdkafka 2.0.2 facts this program relies on and reports
 *	  (rdkafka_mock_handlers.c of v2.0.2):
 *	  - the mock brokers implement Produce, Fetch, ListOffsets, OffsetFetch,
 *	    OffsetCommit, ApiVersion, Metadata, FindCoordinator, InitProducerId,
 *	    JoinGroup, Heartbeat, LeaveGroup, SyncGroup, AddPartitionsToTxn,
 *	    AddOffsetsToTxn, TxnOffsetCommit and EndTxn only.  No error can be
 *	    injected into any other API (the "errors" commands refuse them rather
 *	    than pretend).
 *	  - DescribeConfigs always fails against this cluster, with _TIMED_OUT
 *	    ("Failed while waiting for controller") once the admin request
 *	    timeout expires: Metadata names controller 0, a broker that does not
 *	    exist, and librdkafka sends topic DescribeConfigs (like every admin
 *	    request meant for the controller) only to the controller.  So a relay
 *	    on this cluster never learns a topic's max.message.bytes, and each
 *	    attempt blocks it for the timeout it asked for.
 *	  - an idempotent producer without transactional.id gets no sequence
 *	    validation: the mock acknowledges whatever it is sent.  Use it for
 *	    error paths, never for loss or duplication figures.
 *	  - once a broker has a per-broker error stack for an API (broker-errors),
 *	    that broker no longer consults the cluster-wide stack for that API,
 *	    even when its own stack is empty.
 *
 *	  Recipe, checked by test/t/006_mock_cluster.pl: "errors Produce
 *	  OUT_OF_ORDER_SEQUENCE_NUMBER" makes an idempotent producer fatal
 *	  (rd_kafka_fatal_error() returns OUT_OF_ORDER_SEQUENCE_NUMBER) on its
 *	  next ProduceRequest, if that request is the partition's head of line
 *	  (nothing else in flight for that partition, e.g. an idle producer).
 *
 *-------------------------------------------------------------------------
 */
#include <string.h>
#include <strings.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "linecmd.h"

#define MAX_ARGS	64

typedef struct ApiName
{
	const char *name;
	int16_t		key;
	int			mocked;			/* implemented by the 2.0.2 mock brokers */
} ApiName;

/* Kafka protocol request keys (KIP-4 numbering). */
static const ApiName api_names[] = {
	{"Produce", 0, 1},
	{"Fetch", 1, 1},
	{"ListOffsets", 2, 1},
	{"Metadata", 3, 1},
	{"OffsetCommit", 8, 1},
	{"OffsetFetch", 9, 1},
	{"FindCoordinator", 10, 1},
	{"JoinGroup", 11, 1},
	{"Heartbeat", 12, 1},
	{"LeaveGroup", 13, 1},
	{"SyncGroup", 14, 1},
	{"DescribeGroups", 15, 0},
	{"ListGroups", 16, 0},
	{"SaslHandshake", 17, 0},
	{"ApiVersion", 18, 1},
	{"CreateTopics", 19, 0},
	{"DeleteTopics", 20, 0},
	{"DeleteRecords", 21, 0},
	{"InitProducerId", 22, 1},
	{"OffsetForLeaderEpoch", 23, 0},
	{"AddPartitionsToTxn", 24, 1},
	{"AddOffsetsToTxn", 25, 1},
	{"EndTxn", 26, 1},
	{"TxnOffsetCommit", 28, 1},
	{"DescribeAcls", 29, 0},
	{"CreateAcls", 30, 0},
	{"DeleteAcls", 31, 0},
	{"DescribeConfigs", 32, 0},
	{"AlterConfigs", 33, 0},
	{"CreatePartitions", 37, 0},
	{"SaslAuthenticate", 36, 0},
	{"DeleteGroups", 42, 0},
	{"IncrementalAlterConfigs", 44, 0},
	{"OffsetDelete", 47, 0},
	{NULL, 0, 0}
};

static rd_kafka_mock_cluster_t *mcluster;

/* An API by name (case-insensitive) or number; NULL and an error if neither. */
static const ApiName *
parse_api(const char *s, char *why, size_t whylen)
{
	static ApiName numbered;
	long		key;

	for (const ApiName *a = api_names; a->name; a++)
		if (strcasecmp(a->name, s) == 0)
			return a;
	if (parse_long(s, 0, 32767, &key))
	{
		for (const ApiName *a = api_names; a->name; a++)
			if (a->key == key)
				return a;
		/* an API this table does not name: let librdkafka decide */
		numbered.name = s;
		numbered.key = (int16_t) key;
		numbered.mocked = 1;
		return &numbered;
	}
	snprintf(why, whylen, "unknown API \"%s\"", s);
	return NULL;
}

/*
 * Can errors be injected into this API?  Only into APIs the mock brokers
 * implement; checked for the 2.0.x series the table describes.
 */
static int
api_injectable(const ApiName *api, char *why, size_t whylen)
{
	if (api->mocked || rd_kafka_version() >= 0x02010000)
		return 1;
	snprintf(why, whylen,
			 "the librdkafka %s mock cluster does not implement %s (ApiKey %d), "
			 "so no error can be injected into it%s",
			 rd_kafka_version_str(), api->name, api->key,
			 api->key == 32 ?
			 ": DescribeConfigs fails anyway, with _TIMED_OUT (no controller)" : "");
	return 0;
}

/* An error by name (with or without the RD_KAFKA_RESP_ERR_ prefix) or number. */
static int
parse_err(const char *s, rd_kafka_resp_err_t *out, char *why, size_t whylen)
{
	const struct rd_kafka_err_desc *descs;
	size_t		cnt;
	long		code;

	if (strncasecmp(s, "RD_KAFKA_RESP_ERR_", 18) == 0)
		s += 18;
	rd_kafka_get_err_descs(&descs, &cnt);
	for (size_t i = 0; i < cnt; i++)
	{
		if (descs[i].name && strcasecmp(descs[i].name, s) == 0)
		{
			*out = descs[i].code;
			return 1;
		}
	}
	if (parse_long(s, -200, 32767, &code))
	{
		*out = (rd_kafka_resp_err_t) code;
		return 1;
	}
	snprintf(why, whylen, "unknown error \"%s\"", s);
	return 0;
}

static int
parse_broker(const char *s, int allow_all, int32_t *out, char *why, size_t whylen)
{
	long		id;

	if (!parse_long(s, allow_all ? -1 : 0, INT32_MAX, &id))
	{
		snprintf(why, whylen, "bad broker id \"%s\"%s", s,
				 allow_all ? " (a broker id, or -1 for all)" : "");
		return 0;
	}
	*out = (int32_t) id;
	return 1;
}

static int
check_rkerr(rd_kafka_resp_err_t err, char *why, size_t whylen)
{
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		return 1;
	snprintf(why, whylen, "%s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
	return 0;
}

static int
cmd_errors(int argc, char **argv, char *why, size_t whylen)
{
	const ApiName *api;
	rd_kafka_resp_err_t errs[MAX_ARGS];
	int			n = 0;

	if (argc < 3)
	{
		snprintf(why, whylen, "usage: errors API ERR [ERR ...]");
		return 0;
	}
	if (!(api = parse_api(argv[1], why, whylen)) || !api_injectable(api, why, whylen))
		return 0;
	for (int i = 2; i < argc; i++)
		if (!parse_err(argv[i], &errs[n++], why, whylen))
			return 0;
	rd_kafka_mock_push_request_errors_array(mcluster, api->key, n, errs);
	return 1;
}

static int
cmd_broker_errors(int argc, char **argv, char *why, size_t whylen)
{
	const ApiName *api;
	int32_t		broker;
	rd_kafka_resp_err_t errs[MAX_ARGS];
	long		rtts[MAX_ARGS];
	int			n = 0;

	if (argc < 4)
	{
		snprintf(why, whylen, "usage: broker-errors BROKER API ERR[@RTT_MS] [...]");
		return 0;
	}
	if (!parse_broker(argv[1], 0, &broker, why, whylen) ||
		!(api = parse_api(argv[2], why, whylen)) ||
		!api_injectable(api, why, whylen))
		return 0;
	/* parse everything first: a bad word pushes nothing */
	for (int i = 3; i < argc; i++, n++)
	{
		char	   *at = strchr(argv[i], '@');

		rtts[n] = 0;
		if (at)
		{
			*at = '\0';
			if (!parse_long(at + 1, 0, 3600000, &rtts[n]))
			{
				snprintf(why, whylen, "bad round-trip time \"%s\"", at + 1);
				return 0;
			}
		}
		if (!parse_err(argv[i], &errs[n], why, whylen))
			return 0;
	}
	/* the stack is FIFO: pushing one at a time keeps the order */
	for (int i = 0; i < n; i++)
		if (!check_rkerr(rd_kafka_mock_broker_push_request_error_rtts(mcluster, broker,
																		api->key, 1,
																		errs[i], (int) rtts[i]),
						 why, whylen))
			return 0;
	return 1;
}

static int
cmd_topic(int argc, char **argv, char *why, size_t whylen)
{
	long		parts,
				rf = 1;

	if (argc < 3 || argc > 4 ||
		!parse_long(argv[2], 1, 100000, &parts) ||
		(argc == 4 && !parse_long(argv[3], 1, 1000, &rf)))
	{
		snprintf(why, whylen, "usage: topic TOPIC PARTITIONS [REPLICATION]");
		return 0;
	}
	return check_rkerr(rd_kafka_mock_topic_create(mcluster, argv[1], (int) parts, (int) rf),
					   why, whylen);
}

static int
cmd_partition(int argc, char **argv, char *why, size_t whylen)
{
	long		part;
	int32_t		broker;
	int			leader = strcmp(argv[0], "leader") == 0;

	if (argc != 4 || !parse_long(argv[2], 0, INT32_MAX, &part) ||
		!parse_broker(argv[3], leader, &broker, why, whylen))
	{
		snprintf(why, whylen, "usage: %s TOPIC PARTITION BROKER%s", argv[0],
				 leader ? "|-1" : "");
		return 0;
	}
	if (leader)
		return check_rkerr(rd_kafka_mock_partition_set_leader(mcluster, argv[1],
															  (int32_t) part, broker),
						   why, whylen);
	return check_rkerr(rd_kafka_mock_partition_set_follower(mcluster, argv[1],
															(int32_t) part, broker),
					   why, whylen);
}

/* Runs one command; 1 and *value for an answer "ok [value]", 0 and why for an error. */
static int
run_command(int argc, char **argv, char *value, size_t valuelen,
			char *why, size_t whylen)
{
	const char *cmd = argv[0];
	const ApiName *api;
	int32_t		broker;
	long		a,
				b;
	rd_kafka_resp_err_t err;

	if (strcmp(cmd, "errors") == 0)
		return cmd_errors(argc, argv, why, whylen);
	if (strcmp(cmd, "broker-errors") == 0)
		return cmd_broker_errors(argc, argv, why, whylen);
	if (strcmp(cmd, "topic") == 0)
		return cmd_topic(argc, argv, why, whylen);
	if (strcmp(cmd, "leader") == 0 || strcmp(cmd, "follower") == 0)
		return cmd_partition(argc, argv, why, whylen);
	if (strcmp(cmd, "bootstrap") == 0)
	{
		snprintf(value, valuelen, "%s", rd_kafka_mock_cluster_bootstraps(mcluster));
		return 1;
	}
	if (strcmp(cmd, "pending") == 0)
	{
		size_t		cnt = 0;

		if (argc != 3)
		{
			snprintf(why, whylen, "usage: pending BROKER API");
			return 0;
		}
		if (!parse_broker(argv[1], 0, &broker, why, whylen) ||
			!(api = parse_api(argv[2], why, whylen)) ||
			!check_rkerr(rd_kafka_mock_broker_error_stack_cnt(mcluster, broker,
															  api->key, &cnt),
						 why, whylen))
			return 0;
		snprintf(value, valuelen, "%zu", cnt);
		return 1;
	}
	if (strcmp(cmd, "clear") == 0)
	{
		if (argc != 2)
		{
			snprintf(why, whylen, "usage: clear API");
			return 0;
		}
		if (!(api = parse_api(argv[1], why, whylen)))
			return 0;
		rd_kafka_mock_clear_request_errors(mcluster, api->key);
		return 1;
	}
	if (strcmp(cmd, "down") == 0 || strcmp(cmd, "up") == 0)
	{
		if (argc != 2)
		{
			snprintf(why, whylen, "usage: %s BROKER|-1", cmd);
			return 0;
		}
		if (!parse_broker(argv[1], 1, &broker, why, whylen))
			return 0;
		err = cmd[0] == 'd' ? rd_kafka_mock_broker_set_down(mcluster, broker) :
			rd_kafka_mock_broker_set_up(mcluster, broker);
		return check_rkerr(err, why, whylen);
	}
	if (strcmp(cmd, "rtt") == 0)
	{
		if (argc != 3 || !parse_long(argv[2], 0, 3600000, &a))
		{
			snprintf(why, whylen, "usage: rtt BROKER|-1 MS");
			return 0;
		}
		if (!parse_broker(argv[1], 1, &broker, why, whylen))
			return 0;
		return check_rkerr(rd_kafka_mock_broker_set_rtt(mcluster, broker, (int) a),
						   why, whylen);
	}
	if (strcmp(cmd, "rack") == 0)
	{
		if (argc != 3)
		{
			snprintf(why, whylen, "usage: rack BROKER|-1 RACK");
			return 0;
		}
		if (!parse_broker(argv[1], 1, &broker, why, whylen))
			return 0;
		return check_rkerr(rd_kafka_mock_broker_set_rack(mcluster, broker, argv[2]),
						   why, whylen);
	}
	if (strcmp(cmd, "follower-wmarks") == 0)
	{
		long		part;

		if (argc != 5 || !parse_long(argv[2], 0, INT32_MAX, &part) ||
			!parse_long(argv[3], -1, INT32_MAX, &a) ||
			!parse_long(argv[4], -1, INT32_MAX, &b))
		{
			snprintf(why, whylen, "usage: follower-wmarks TOPIC PARTITION LO HI");
			return 0;
		}
		return check_rkerr(rd_kafka_mock_partition_set_follower_wmarks(mcluster, argv[1],
																	   (int32_t) part,
																	   a, b),
						   why, whylen);
	}
	if (strcmp(cmd, "topic-error") == 0)
	{
		if (argc != 3)
		{
			snprintf(why, whylen, "usage: topic-error TOPIC ERR");
			return 0;
		}
		if (!parse_err(argv[2], &err, why, whylen))
			return 0;
		rd_kafka_mock_topic_set_error(mcluster, argv[1], err);
		return 1;
	}
	if (strcmp(cmd, "coordinator") == 0)
	{
		if (argc != 4 ||
			(strcmp(argv[1], "transaction") != 0 && strcmp(argv[1], "group") != 0))
		{
			snprintf(why, whylen, "usage: coordinator transaction|group KEY BROKER");
			return 0;
		}
		if (!parse_broker(argv[3], 0, &broker, why, whylen))
			return 0;
		return check_rkerr(rd_kafka_mock_coordinator_set(mcluster, argv[1], argv[2], broker),
						   why, whylen);
	}
	if (strcmp(cmd, "apiversion") == 0)
	{
		if (argc != 4 || !parse_long(argv[2], -1, 100, &a) ||
			!parse_long(argv[3], -1, 100, &b))
		{
			snprintf(why, whylen, "usage: apiversion API MIN MAX");
			return 0;
		}
		if (!(api = parse_api(argv[1], why, whylen)))
			return 0;
		return check_rkerr(rd_kafka_mock_set_apiversion(mcluster, api->key,
														(int16_t) a, (int16_t) b),
						   why, whylen);
	}
	snprintf(why, whylen, "unknown command \"%s\"", cmd);
	return 0;
}

static void
usage(const char *prog)
{
	fprintf(stderr,
			"usage: %s [-b BROKERS] [-t TOPIC:PARTITIONS[:REPLICATION]]... [-d]\n"
			"Prints the bootstrap servers, then answers commands on stdin "
			"(see the comment at the top of mock_cluster.c).\n", prog);
	exit(2);
}

int
main(int argc, char **argv)
{
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	char		errstr[512];
	char		line[8192];
	long		brokers = 1;
	int			debug = 0;
	int			ntopics = 0;
	char	   *topics[MAX_ARGS];

	for (int i = 1; i < argc; i++)
	{
		if (strcmp(argv[i], "-b") == 0 && i + 1 < argc)
		{
			if (!parse_long(argv[++i], 1, 64, &brokers))
				usage(argv[0]);
		}
		else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc && ntopics < MAX_ARGS)
			topics[ntopics++] = argv[++i];
		else if (strcmp(argv[i], "-d") == 0)
			debug = 1;
		else
			usage(argv[0]);
	}

	/* a handle for the cluster's book-keeping; it connects to nothing */
	conf = rd_kafka_conf_new();
	if (rd_kafka_conf_set(conf, "client.id", "cqrs_sync_mock_cluster",
						  errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		(debug && rd_kafka_conf_set(conf, "debug", "mock",
									errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK))
	{
		fprintf(stderr, "mock_cluster: %s\n", errstr);
		return 1;
	}
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fprintf(stderr, "mock_cluster: %s\n", errstr);
		return 1;
	}
	mcluster = rd_kafka_mock_cluster_new(rk, (int) brokers);
	if (mcluster == NULL)
	{
		fprintf(stderr, "mock_cluster: could not create a mock cluster\n");
		return 1;
	}
	for (int i = 0; i < ntopics; i++)
	{
		char	   *words[4];
		int			n = 0;
		char		why[512];

		for (char *tok = strtok(topics[i], ":"); tok && n < 4; tok = strtok(NULL, ":"))
			words[n++] = tok;
		if (n < 2 || n > 3)
			usage(argv[0]);
		memmove(words + 1, words, n * sizeof(char *));
		words[0] = "topic";
		if (!cmd_topic(n + 1, words, why, sizeof(why)))
		{
			fprintf(stderr, "mock_cluster: -t %s: %s\n", words[1], why);
			return 1;
		}
	}

	answer("%s", rd_kafka_mock_cluster_bootstraps(mcluster));

	while (fgets(line, sizeof(line), stdin))
	{
		char	   *words[MAX_ARGS];
		char		value[1024] = "";
		char		why[1024] = "";
		int			n;

		n = split_words(line, words, MAX_ARGS);
		if (n == 0)
			continue;
		if (n < 0)
		{
			answer("error: more than %d words", MAX_ARGS);
			continue;
		}
		if (strcmp(words[0], "quit") == 0)
		{
			answer("ok");
			break;
		}
		if (run_command(n, words, value, sizeof(value), why, sizeof(why)))
			answer(value[0] ? "ok %s" : "ok%s", value);
		else
			answer("error: %s", why);
	}

	rd_kafka_mock_cluster_destroy(mcluster);
	rd_kafka_destroy(rk);
	return 0;
}
