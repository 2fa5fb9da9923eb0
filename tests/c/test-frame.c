/* NDJSON framing (frame.h, docs/protocol.md "Framing"): lines are delivered whole however the bytes arrive, empty
 * lines are skipped, and a line over the limit is refused as soon as the limit is passed, newline or not. */
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "task.h"

#define ONE_MIB ((size_t)1 << 20) /* the protocol's default max_frame_bytes */

/* Copies every line the framer delivers; returns stop_rc for the stop_at'th line (1-based) when set. */
typedef struct collector_s {
  char *lines[64];
  size_t lens[64];
  size_t n;
  size_t stop_at;
  int stop_rc;
} collector_t;

static int collect(void *ctx, const char *line, size_t len) {
  collector_t *c = ctx;
  ASSERT_LT(c->n, 64);
  ASSERT_GT(len, 0); /* empty lines are never delivered */
  ASSERT_NULL(memchr(line, '\n', len));
  c->lines[c->n] = malloc(len + 1);
  ASSERT_NOT_NULL(c->lines[c->n]);
  memcpy(c->lines[c->n], line, len);
  c->lines[c->n][len] = '\0';
  c->lens[c->n] = len;
  c->n++;
  return c->stop_at && c->n == c->stop_at ? c->stop_rc : 0;
}

static void collector_free(collector_t *c) {
  for (size_t i = 0; i < c->n; i++) free(c->lines[i]);
  memset(c, 0, sizeof *c);
}

static int feed_str(pa_framer_t *f, const char *s, collector_t *c) { return pa_framer_feed(f, s, strlen(s), collect, c); }

/* A line of `len` bytes of a repeating pattern, optionally followed by '\n'. */
static char *make_line(size_t len, int newline) {
  char *p = malloc(len + 2);
  ASSERT_NOT_NULL(p);
  for (size_t i = 0; i < len; i++) p[i] = (char)('a' + i % 26);
  if (newline) p[len++] = '\n';
  p[len] = '\0';
  return p;
}

TEST_IMPL(frame_split_byte_by_byte) {
  static const char msg[] = "{\"v\":\"1\",\"method\":\"heartbeat.post\"}\n{\"v\":\"1\",\"id\":2,\"result\":{}}\n";
  pa_framer_t f;
  collector_t c = {0};
  pa_framer_init(&f, 1024);
  size_t held = 0;
  for (size_t i = 0; i < sizeof msg - 1; i++) {
    ASSERT_OK(pa_framer_feed(&f, msg + i, 1, collect, &c));
    held = msg[i] == '\n' ? 0 : held + 1;
    ASSERT_UINT64_EQ(pa_framer_pending(&f), held);
  }
  ASSERT_EQ(c.n, 2);
  ASSERT_STR_EQ(c.lines[0], "{\"v\":\"1\",\"method\":\"heartbeat.post\"}");
  ASSERT_STR_EQ(c.lines[1], "{\"v\":\"1\",\"id\":2,\"result\":{}}");
  ASSERT_UINT64_EQ(pa_framer_pending(&f), 0);
  collector_free(&c);
  pa_framer_free(&f);
  return 0;
}

TEST_IMPL(frame_many_lines_one_feed) {
  pa_framer_t f;
  collector_t c = {0};
  pa_framer_init(&f, 1024);
  /* Three whole lines and the start of a fourth in one read. */
  ASSERT_OK(feed_str(&f, "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n{\"d\"", &c));
  ASSERT_EQ(c.n, 3);
  ASSERT_STR_EQ(c.lines[0], "{\"a\":1}");
  ASSERT_STR_EQ(c.lines[1], "{\"b\":2}");
  ASSERT_STR_EQ(c.lines[2], "{\"c\":3}");
  ASSERT_UINT64_EQ(pa_framer_pending(&f), 4);
  ASSERT_OK(feed_str(&f, ":4}\n{\"e\":5}\n", &c));
  ASSERT_EQ(c.n, 5);
  ASSERT_STR_EQ(c.lines[3], "{\"d\":4}");
  ASSERT_STR_EQ(c.lines[4], "{\"e\":5}");
  ASSERT_UINT64_EQ(pa_framer_pending(&f), 0);
  collector_free(&c);
  pa_framer_free(&f);
  return 0;
}

TEST_IMPL(frame_exact_limit_accepted) {
  char *line = make_line(ONE_MIB, 1);
  pa_framer_t f;
  collector_t c = {0};

  /* In one piece: delivered straight from the caller's buffer. */
  pa_framer_init(&f, ONE_MIB);
  ASSERT_OK(pa_framer_feed(&f, line, ONE_MIB + 1, collect, &c));
  ASSERT_EQ(c.n, 1);
  ASSERT_UINT64_EQ(c.lens[0], ONE_MIB);
  ASSERT_MEM_EQ(c.lines[0], line, ONE_MIB);
  pa_framer_free(&f);
  collector_free(&c);

  /* In 4 KiB reads: held until the newline; exactly the limit held is still accepted. */
  pa_framer_init(&f, ONE_MIB);
  for (size_t off = 0; off < ONE_MIB; off += 4096) ASSERT_OK(pa_framer_feed(&f, line + off, 4096, collect, &c));
  ASSERT_EQ(c.n, 0);
  ASSERT_UINT64_EQ(pa_framer_pending(&f), ONE_MIB);
  ASSERT_OK(pa_framer_feed(&f, "\n", 1, collect, &c));
  ASSERT_EQ(c.n, 1);
  ASSERT_UINT64_EQ(c.lens[0], ONE_MIB);
  ASSERT_MEM_EQ(c.lines[0], line, ONE_MIB);
  pa_framer_free(&f);
  collector_free(&c);

  free(line);
  return 0;
}

TEST_IMPL(frame_limit_plus_one_refused) {
  char *line = make_line(ONE_MIB + 1, 1);
  pa_framer_t f;
  collector_t c = {0};

  /* Limit + 1 with its newline, in one piece. */
  pa_framer_init(&f, ONE_MIB);
  ASSERT_EQ(pa_framer_feed(&f, line, ONE_MIB + 2, collect, &c), PA_EFRAME_TOO_LARGE);
  ASSERT_EQ(c.n, 0);
  pa_framer_free(&f);

  /* A good line first is still delivered; the long one after it is refused. */
  pa_framer_init(&f, 8);
  ASSERT_EQ(feed_str(&f, "12345678\n123456789\n", &c), PA_EFRAME_TOO_LARGE);
  ASSERT_EQ(c.n, 1);
  ASSERT_STR_EQ(c.lines[0], "12345678");
  pa_framer_free(&f);
  collector_free(&c);

  /* The limit held, then one more byte and the newline together. */
  pa_framer_init(&f, 8);
  ASSERT_OK(feed_str(&f, "12345678", &c));
  ASSERT_EQ(feed_str(&f, "9\n", &c), PA_EFRAME_TOO_LARGE);
  ASSERT_EQ(c.n, 0);
  pa_framer_free(&f);

  free(line);
  return 0;
}

TEST_IMPL(frame_limit_plus_one_refused_before_newline) {
  char *line = make_line(ONE_MIB + 1, 0);
  pa_framer_t f;
  collector_t c = {0};

  /* Limit + 1 bytes and no newline in one read: refused now, not when the newline comes. */
  pa_framer_init(&f, ONE_MIB);
  ASSERT_EQ(pa_framer_feed(&f, line, ONE_MIB + 1, collect, &c), PA_EFRAME_TOO_LARGE);
  ASSERT_EQ(c.n, 0);
  pa_framer_free(&f);

  /* Exactly the limit held over many reads, then a single byte more: refused at that byte. */
  pa_framer_init(&f, ONE_MIB);
  for (size_t off = 0; off < ONE_MIB; off += 65536) ASSERT_OK(pa_framer_feed(&f, line + off, 65536, collect, &c));
  ASSERT_UINT64_EQ(pa_framer_pending(&f), ONE_MIB);
  ASSERT_EQ(pa_framer_feed(&f, line + ONE_MIB, 1, collect, &c), PA_EFRAME_TOO_LARGE);
  ASSERT_EQ(c.n, 0);
  pa_framer_free(&f);

  /* A complete line, then an over-long tail without a newline in the same read. */
  pa_framer_init(&f, 4);
  ASSERT_EQ(feed_str(&f, "abcd\nefghi", &c), PA_EFRAME_TOO_LARGE);
  ASSERT_EQ(c.n, 1);
  ASSERT_STR_EQ(c.lines[0], "abcd");
  pa_framer_free(&f);
  collector_free(&c);

  free(line);
  return 0;
}

TEST_IMPL(frame_empty_lines_skipped) {
  pa_framer_t f;
  collector_t c = {0};
  pa_framer_init(&f, 64);
  ASSERT_OK(feed_str(&f, "\n\n\n{\"a\":1}\n\n\n{\"b\":2}\n\n", &c));
  ASSERT_OK(feed_str(&f, "\n", &c));
  ASSERT_EQ(c.n, 2);
  ASSERT_STR_EQ(c.lines[0], "{\"a\":1}");
  ASSERT_STR_EQ(c.lines[1], "{\"b\":2}");
  /* A held part followed by "\n\n": one line, then an empty one that is skipped. */
  ASSERT_OK(feed_str(&f, "{\"c\"", &c));
  ASSERT_OK(feed_str(&f, ":3}\n\n", &c));
  ASSERT_EQ(c.n, 3);
  ASSERT_STR_EQ(c.lines[2], "{\"c\":3}");
  ASSERT_UINT64_EQ(pa_framer_pending(&f), 0);
  /* A trailing '\r' is not stripped (docs/protocol.md): the line keeps it. */
  ASSERT_OK(feed_str(&f, "x\r\n", &c));
  ASSERT_EQ(c.n, 4);
  ASSERT_STR_EQ(c.lines[3], "x\r");
  collector_free(&c);
  pa_framer_free(&f);
  return 0;
}

TEST_IMPL(frame_callback_stops_feed) {
  pa_framer_t f;
  collector_t c = {0};

  /* Lines wholly inside the fed buffer: the second line's return value stops the feed. */
  pa_framer_init(&f, 64);
  c.stop_at = 2;
  c.stop_rc = 42;
  ASSERT_EQ(feed_str(&f, "one\ntwo\nthree\n", &c), 42);
  ASSERT_EQ(c.n, 2);
  ASSERT_STR_EQ(c.lines[1], "two");
  pa_framer_free(&f);
  collector_free(&c);

  /* A line completed from a held part: its callback's value is returned too, and nothing after it is delivered. */
  pa_framer_init(&f, 64);
  c.stop_at = 1;
  c.stop_rc = -5;
  ASSERT_OK(feed_str(&f, "hel", &c));
  ASSERT_EQ(feed_str(&f, "d\nnext\n", &c), -5);
  ASSERT_EQ(c.n, 1);
  ASSERT_STR_EQ(c.lines[0], "held");
  pa_framer_free(&f);
  collector_free(&c);
  return 0;
}

TEST_IMPL(frame_held_part_completed_intact) {
  /* 10000 bytes (past the framer's first 4 KiB buffer, so it grows) in 7-byte reads, then more lines. */
  char *line = make_line(10000, 1);
  pa_framer_t f;
  collector_t c = {0};
  pa_framer_init(&f, ONE_MIB);
  size_t total = 10001, off = 0;
  while (off < total) {
    size_t n = total - off < 7 ? total - off : 7;
    ASSERT_OK(pa_framer_feed(&f, line + off, n, collect, &c));
    off += n;
  }
  ASSERT_EQ(c.n, 1);
  ASSERT_UINT64_EQ(c.lens[0], 10000);
  ASSERT_MEM_EQ(c.lines[0], line, 10000);
  /* The held buffer is reused: a short held line after a long one is not polluted by the old bytes. */
  ASSERT_OK(feed_str(&f, "sh", &c));
  ASSERT_OK(feed_str(&f, "ort\nwhole\nta", &c));
  ASSERT_OK(feed_str(&f, "il\n", &c));
  ASSERT_EQ(c.n, 4);
  ASSERT_STR_EQ(c.lines[1], "short");
  ASSERT_STR_EQ(c.lines[2], "whole");
  ASSERT_STR_EQ(c.lines[3], "tail");
  collector_free(&c);
  pa_framer_free(&f);
  free(line);
  return 0;
}

TEST_IMPL(frame_free_while_holding) {
  /* A connection that closes with half a line held: freeing releases the held bytes (LSan checks), and freeing twice
   * is harmless. */
  pa_framer_t f;
  collector_t c = {0};
  char *line = make_line(100000, 0);
  pa_framer_init(&f, ONE_MIB);
  ASSERT_OK(pa_framer_feed(&f, line, 100000, collect, &c));
  ASSERT_UINT64_EQ(pa_framer_pending(&f), 100000);
  pa_framer_free(&f);
  ASSERT_UINT64_EQ(pa_framer_pending(&f), 0);
  ASSERT_NULL(f.held.data);
  pa_framer_free(&f);
  ASSERT_EQ(c.n, 0);
  free(line);
  return 0;
}
