// The subcommands of `andyllm`, one factory per file (launch/cmd_*.cpp).
#pragma once

#include "launch/cli.h"

namespace andy {

Subcommand make_version_command();
Subcommand make_train_command();
Subcommand make_serve_command();
Subcommand make_generate_command();
Subcommand make_preprocess_command();
Subcommand make_quantize_command();
Subcommand make_export_command();
Subcommand make_eval_command();
Subcommand make_bench_command();

}  // namespace andy
