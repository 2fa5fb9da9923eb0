/* Every test, once. tests/c/CMakeLists.txt reads the TEST_ENTRY lines to register one ctest test per entry, so keep
 * one entry per line. Only runner.c includes this file. */
#include "task.h"

#define TEST_DECLARE(name) int run_test_##name(void);

TEST_DECLARE(frame_split_byte_by_byte)
TEST_DECLARE(frame_many_lines_one_feed)
TEST_DECLARE(frame_exact_limit_accepted)
TEST_DECLARE(frame_limit_plus_one_refused)
TEST_DECLARE(frame_limit_plus_one_refused_before_newline)
TEST_DECLARE(frame_empty_lines_skipped)
TEST_DECLARE(frame_callback_stops_feed)
TEST_DECLARE(frame_held_part_completed_intact)
TEST_DECLARE(frame_free_while_holding)

TEST_DECLARE(backoff_delay_within_ceiling)
TEST_DECLARE(backoff_ceiling_doubles_and_caps)
TEST_DECLARE(backoff_never_above_max)
TEST_DECLARE(backoff_reset)
TEST_DECLARE(backoff_seeds_differ)
TEST_DECLARE(backoff_unit_range)
TEST_DECLARE(backoff_init_clamps)
TEST_DECLARE(backoff_extreme_max)

TEST_DECLARE(proto_parse_request)
TEST_DECLARE(proto_parse_notification)
TEST_DECLARE(proto_parse_response)
TEST_DECLARE(proto_invalid_json)
TEST_DECLARE(proto_not_object)
TEST_DECLARE(proto_scalar_not_object)
TEST_DECLARE(proto_version_mismatch)
TEST_DECLARE(proto_bad_id)
TEST_DECLARE(proto_bad_method)
TEST_DECLARE(proto_params_not_object)
TEST_DECLARE(proto_response_result_xor_error)
TEST_DECLARE(proto_huge_integer)
TEST_DECLARE(proto_integer_beyond_double)
TEST_DECLARE(proto_builders_round_trip)
TEST_DECLARE(proto_error_line_null_id)

TEST_DECLARE(tls_handshake_echo_hostname)
TEST_DECLARE(tls_handshake_echo_ip)
TEST_DECLARE(tls_wrong_ca)
TEST_DECLARE(tls_wrong_server_name)
TEST_DECLARE(tls_wrong_ip_address)
TEST_DECLARE(tls_old_protocol_refused)
TEST_DECLARE(tls_ctx_missing_ca_file)
TEST_DECLARE(tls_ctx_bad_client_key)
TEST_DECLARE(tls_client_cert_reloaded_per_session)

TEST_DECLARE(bridge_put_take_py)
TEST_DECLARE(bridge_put_take_c)
TEST_DECLARE(bridge_put_c_wakes_loop)
TEST_DECLARE(bridge_limit_drops)
TEST_DECLARE(bridge_py_lag)

TEST_DECLARE(hostcfg_minimal_defaults)
TEST_DECLARE(hostcfg_full)
TEST_DECLARE(hostcfg_unknown_key)
TEST_DECLARE(hostcfg_unknown_endpoint_key)
TEST_DECLARE(hostcfg_endpoints_invalid)
TEST_DECLARE(hostcfg_bad_port)
TEST_DECLARE(hostcfg_ca_file_invalid)
TEST_DECLARE(hostcfg_bad_log_level)
TEST_DECLARE(hostcfg_bad_number)
TEST_DECLARE(hostcfg_hello_invalid)
TEST_DECLARE(hostcfg_not_json)

typedef struct pa_task_entry_s {
  const char *name;
  int (*main)(void);
} pa_task_entry_t;

#define TASK_LIST_START static const pa_task_entry_t pa_tasks[] = {
#define TEST_ENTRY(name) {#name, run_test_##name},
#define TASK_LIST_END {NULL, NULL}};

TASK_LIST_START
  TEST_ENTRY(frame_split_byte_by_byte)
  TEST_ENTRY(frame_many_lines_one_feed)
  TEST_ENTRY(frame_exact_limit_accepted)
  TEST_ENTRY(frame_limit_plus_one_refused)
  TEST_ENTRY(frame_limit_plus_one_refused_before_newline)
  TEST_ENTRY(frame_empty_lines_skipped)
  TEST_ENTRY(frame_callback_stops_feed)
  TEST_ENTRY(frame_held_part_completed_intact)
  TEST_ENTRY(frame_free_while_holding)

  TEST_ENTRY(backoff_delay_within_ceiling)
  TEST_ENTRY(backoff_ceiling_doubles_and_caps)
  TEST_ENTRY(backoff_never_above_max)
  TEST_ENTRY(backoff_reset)
  TEST_ENTRY(backoff_seeds_differ)
  TEST_ENTRY(backoff_unit_range)
  TEST_ENTRY(backoff_init_clamps)
  TEST_ENTRY(backoff_extreme_max)

  TEST_ENTRY(proto_parse_request)
  TEST_ENTRY(proto_parse_notification)
  TEST_ENTRY(proto_parse_response)
  TEST_ENTRY(proto_invalid_json)
  TEST_ENTRY(proto_not_object)
  TEST_ENTRY(proto_scalar_not_object)
  TEST_ENTRY(proto_version_mismatch)
  TEST_ENTRY(proto_bad_id)
  TEST_ENTRY(proto_bad_method)
  TEST_ENTRY(proto_params_not_object)
  TEST_ENTRY(proto_response_result_xor_error)
  TEST_ENTRY(proto_huge_integer)
  TEST_ENTRY(proto_integer_beyond_double)
  TEST_ENTRY(proto_builders_round_trip)
  TEST_ENTRY(proto_error_line_null_id)

  TEST_ENTRY(tls_handshake_echo_hostname)
  TEST_ENTRY(tls_handshake_echo_ip)
  TEST_ENTRY(tls_wrong_ca)
  TEST_ENTRY(tls_wrong_server_name)
  TEST_ENTRY(tls_wrong_ip_address)
  TEST_ENTRY(tls_old_protocol_refused)
  TEST_ENTRY(tls_ctx_missing_ca_file)
  TEST_ENTRY(tls_ctx_bad_client_key)
  TEST_ENTRY(tls_client_cert_reloaded_per_session)

  TEST_ENTRY(bridge_put_take_py)
  TEST_ENTRY(bridge_put_take_c)
  TEST_ENTRY(bridge_put_c_wakes_loop)
  TEST_ENTRY(bridge_limit_drops)
  TEST_ENTRY(bridge_py_lag)

  TEST_ENTRY(hostcfg_minimal_defaults)
  TEST_ENTRY(hostcfg_full)
  TEST_ENTRY(hostcfg_unknown_key)
  TEST_ENTRY(hostcfg_unknown_endpoint_key)
  TEST_ENTRY(hostcfg_endpoints_invalid)
  TEST_ENTRY(hostcfg_bad_port)
  TEST_ENTRY(hostcfg_ca_file_invalid)
  TEST_ENTRY(hostcfg_bad_log_level)
  TEST_ENTRY(hostcfg_bad_number)
  TEST_ENTRY(hostcfg_hello_invalid)
  TEST_ENTRY(hostcfg_not_json)
TASK_LIST_END
