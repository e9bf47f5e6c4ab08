// A small RAII wrapper over the C ABI: an Engine owns an sglang_engine*, results are
// copied into std types and freed at once, errors become exceptions.
#pragma once

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "sglang.h"

namespace sglang {

class Error : public std::runtime_error {
public:
    Error(const std::string &what, sglang_status status)
        : std::runtime_error(what + " (status " + std::to_string(static_cast<int>(status)) + "): " + sglang_last_error()),
          status_(status) {}
    sglang_status status() const { return status_; }

private:
    sglang_status status_;
};

inline void check(sglang_status status, const char *what) {
    if (status != SGLANG_OK) {
        throw Error(what, status);
    }
}

struct Result {
    std::string text;
    std::vector<int32_t> tokens;
    sglang_finish_reason finish_reason = SGLANG_FINISH_NONE;
};

class Engine {
public:
    explicit Engine(const std::string &model_path, int64_t max_total_tokens = 0) {
        check(SGLANG_CHECK_VERSION(), "version check");
        sglang_engine_params p = sglang_engine_default_params();
        p.model_path = model_path.c_str();
        p.max_total_tokens = max_total_tokens;
        sglang_engine *raw = nullptr;
        check(sglang_engine_create(&p, &raw), "sglang_engine_create");
        engine_.reset(raw);
    }

    Result generate(const sglang_request_params &params) {
        sglang_result *raw = nullptr;
        check(sglang_generate(engine_.get(), &params, &raw), "sglang_generate");
        std::unique_ptr<sglang_result, decltype(&sglang_result_free)> owned(raw, &sglang_result_free);
        return copy(*owned);
    }

    // Calls on_text with each piece of text; returning false cancels.
    Result stream(const sglang_request_params &params, const std::function<bool(const std::string &)> &on_text) {
        sglang_result *raw = nullptr;
        auto trampoline = [](const sglang_chunk *chunk, void *user) -> int {
            auto *fn = static_cast<const std::function<bool(const std::string &)> *>(user);
            return (*fn)(std::string(chunk->text, chunk->text_len)) ? 0 : 1;
        };
        sglang_status st = sglang_generate_stream(engine_.get(), &params, trampoline,
                                                  const_cast<std::function<bool(const std::string &)> *>(&on_text), &raw);
        std::unique_ptr<sglang_result, decltype(&sglang_result_free)> owned(raw, &sglang_result_free);
        if (st != SGLANG_OK && st != SGLANG_ERR_CANCELLED) {
            throw Error("sglang_generate_stream", st);
        }
        return copy(*owned);
    }

private:
    static Result copy(const sglang_result &r) {
        Result out;
        out.text.assign(r.text, r.text_len);
        out.tokens.assign(r.tokens, r.tokens + r.n_tokens);
        out.finish_reason = r.finish_reason;
        return out;
    }

    struct Free {
        void operator()(sglang_engine *e) const { sglang_engine_free(e); }
    };
    std::unique_ptr<sglang_engine, Free> engine_;
};

}  // namespace sglang
