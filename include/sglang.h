/*
 * sglang.h - the C ABI of the sglang inference engine (libsglang.so / libsglang.a).
 *
 * One engine owns a model and its KV cache and runs a scheduler thread; any number of
 * threads may call into one engine at once, and their requests are batched together.
 *
 * Conventions
 *   - Every function that can fail returns an sglang_status; on failure,
 *     sglang_last_error() describes it (a thread-local string), and each such call that
 *     succeeds clears it to "".
 *   - Parameter structs start with `size_t struct_size`: fill them with the matching
 *     sglang_*_default_params() and change fields after. A struct from an older header
 *     (smaller struct_size) works, missing fields taking their defaults; one from a newer
 *     header than the library (larger struct_size) is refused with SGLANG_ERR_VERSION. A
 *     struct_size must end at the end of a field (as every header version's sizeof does);
 *     one that ends inside a field is refused with SGLANG_ERR_INVALID_ARGUMENT.
 *   - Ownership: every pointer the library returns says who frees it and with what.
 *     Strings the library allocates are freed with sglang_string_free().
 *   - Text is UTF-8. Invalid UTF-8 input is refused with SGLANG_ERR_INVALID_ARGUMENT.
 *   - No function crashes on NULL pointers, bad sizes or out-of-range values, and no Rust
 *     panic crosses this boundary (it becomes SGLANG_ERR_INTERNAL).
 *   - Callbacks (sglang_stream_callback) must return normally: a C++ exception thrown
 *     through the library, or a longjmp() out of a callback, is undefined behaviour (locks
 *     stay held, the request leaks). Catch inside the callback and return non-zero to cancel.
 *   - fork(): an engine does not survive it. Its threads exist only in the process that
 *     created it, so in a forked child every call on an inherited engine or request returns
 *     SGLANG_ERR_ENGINE_STOPPED (sglang_tokenize: SGLANG_TOKENIZE_ERROR) instead of blocking,
 *     and sglang_engine_free / sglang_request_free return without freeing. Create engines
 *     after forking (or in the child).
 *
 * Version: SGLANG_VERSION_MAJOR changes only with incompatible ABI changes (and the soname,
 * libsglang.so.MAJOR); MINOR adds functions or struct fields at the end.
 */
#ifndef SGLANG_H
#define SGLANG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SGLANG_VERSION_MAJOR 1
#define SGLANG_VERSION_MINOR 4
#define SGLANG_VERSION_PATCH 0

/* Checks at run time that the library can serve a caller compiled against this header:
 * evaluates to SGLANG_OK or SGLANG_ERR_VERSION. */
#define SGLANG_CHECK_VERSION() sglang_check_version(SGLANG_VERSION_MAJOR, SGLANG_VERSION_MINOR)

/* Returned by sglang_tokenize() when the call itself is invalid (see sglang_last_error()). */
#define SGLANG_TOKENIZE_ERROR INT32_MIN

typedef enum sglang_status {
    SGLANG_OK = 0,
    /* A NULL pointer, invalid UTF-8, a size or value out of range (the message names it). */
    SGLANG_ERR_INVALID_ARGUMENT = 1,
    /* The model directory could not be loaded (the message names the file and tensor). */
    SGLANG_ERR_LOAD = 2,
    /* The caller was built against a newer ABI than this library provides. */
    SGLANG_ERR_VERSION = 3,
    /* The engine's request queue is full; retry later. */
    SGLANG_ERR_QUEUE_FULL = 4,
    /* The request was cancelled (callback returned non-zero, or sglang_request_abort()). */
    SGLANG_ERR_CANCELLED = 5,
    /* The request had already finished. */
    SGLANG_ERR_FINISHED = 6,
    /* The engine has stopped (it was freed while requests ran, or failed). */
    SGLANG_ERR_ENGINE_STOPPED = 7,
    /* An internal error (including a caught panic); the message says more. */
    SGLANG_ERR_INTERNAL = 8
} sglang_status;

typedef enum sglang_finish_reason {
    SGLANG_FINISH_NONE = 0,   /* not finished (streaming chunks before the last) */
    SGLANG_FINISH_STOP = 1,   /* an EOS or stop token, or a stop string */
    SGLANG_FINISH_LENGTH = 2, /* max_new_tokens or the context length */
    SGLANG_FINISH_ABORT = 3   /* cancelled */
} sglang_finish_reason;

/* An engine: a loaded model, its KV cache and its scheduler thread. Opaque. */
typedef struct sglang_engine sglang_engine;
/* One generation in progress (see sglang_request_start). Opaque. */
typedef struct sglang_request sglang_request;

typedef struct sglang_engine_params {
    size_t struct_size;         /* sizeof(sglang_engine_params) */
    const char *model_path;     /* Hugging Face directory, or a .gguf file (see load_format);
                                   required */
    const char *device;         /* "auto" (default), "cpu" or "cuda" */
    float mem_fraction_static;  /* (0, 1]; default 0.9 (device memory for weights and KV) */
    int32_t max_running_requests; /* >= 1; default 256 */
    int32_t enable_radix_cache; /* 1 (default) or 0 */
    int32_t page_size;          /* tokens per KV page, 1..1024; default 16 */
    int64_t max_total_tokens;   /* KV pool size in tokens on the CPU; 0 = default. A pool
                                   larger than the machine's memory (or the address space) is
                                   SGLANG_ERR_INVALID_ARGUMENT */
    int32_t num_threads;        /* CPU threads; 0 = all cores */
    /* Since ABI 1.1. A caller built against 1.0 passes a struct that ends before these:
     * they take their defaults. */
    int32_t reserved0;          /* was padding in 1.0 (may hold anything); ignored */
    int32_t tp_size;            /* tensor-parallel ranks, as threads of this process sharing
                                   the cores (CPU); >= 1; default 1 */
    /* Since ABI 1.3. A caller built against 1.1 or 1.2 passes a struct that ends before
     * these: they take their defaults. */
    int32_t reserved1;          /* was padding in 1.2 (may hold anything); ignored */
    const char *load_format;    /* NULL or "auto" (default: "gguf" when model_path is a .gguf
                                   file, or a directory holding one and no safetensors, whose
                                   metadata then stands in for a missing config.json and
                                   tokenizer.json), "safetensors", "gguf" or "dummy" */
    const char *quantization;   /* NULL (default: weights as stored) or "q8_0", "q4_0",
                                   "q4_1", "q5_0", "q4_k", "q6_k": quantize bf16/f16/f32
                                   weights while loading (not with GGUF or tp_size > 1) */
    /* Since ABI 1.4. A caller built against 1.3 passes a struct that ends before these:
     * they take their defaults. */
    const char *kv_cache_dtype; /* NULL or "auto" (default: f32 on the CPU, bf16 on CUDA),
                                   "fp32" (CPU) or "bf16": the KV cache's element type */
    const char *dtype;          /* NULL or "auto" (default: bf16 on CUDA and on CPUs with
                                   AVX-512 BF16, else f32),
                                   "float32" (CPU) or "bfloat16": the matrix products'
                                   inputs (CPU: activations rounded to bf16 before products
                                   with bf16 weights) */
} sglang_engine_params;

typedef struct sglang_request_params {
    size_t struct_size;         /* sizeof(sglang_request_params) */
    /* The prompt: either UTF-8 text (tokens NULL) or token ids (text NULL), not both: a
     * non-NULL tokens beside text is SGLANG_ERR_INVALID_ARGUMENT even when n_tokens is 0. */
    const char *text;
    const int32_t *tokens;
    size_t n_tokens;
    int32_t add_special_tokens; /* text only: 1 (default) adds the model's BOS if it uses one;
                                   0 for text that already went through the chat template */
    /* Sampling. */
    int32_t max_new_tokens;     /* >= 0; default 128 */
    float temperature;          /* >= 0; 0 is greedy; default 1 */
    float top_p;                /* (0, 1]; default 1 */
    int32_t top_k;              /* -1 (default) or 0: disabled; or >= 1 */
    float min_p;                /* [0, 1]; default 0 */
    float repetition_penalty;   /* (0, 2]; default 1 */
    float frequency_penalty;    /* [-2, 2]; default 0 */
    float presence_penalty;     /* [-2, 2]; default 0 */
    int32_t use_seed;           /* 1: sample with `seed` (reproducible); default 0 */
    uint64_t seed;
    int32_t ignore_eos;         /* 1: do not stop at the model's EOS; default 0 */
    const char *const *stop;    /* stop strings (UTF-8), `n_stop` of them; may be NULL */
    size_t n_stop;
    const int32_t *stop_token_ids; /* may be NULL */
    size_t n_stop_token_ids;
    /* Since ABI 1.2 (a caller built against an older header passes a struct that ends before
     * these: no constraint). Structured output: the generated text is constrained to match
     * at most one of these (UTF-8, NULL: none; more than one: SGLANG_ERR_INVALID_ARGUMENT,
     * as is one that does not compile, with the compiler's message). */
    const char *json_schema;    /* a JSON schema, as JSON text */
    const char *regex;          /* a regular expression the whole output must match */
    const char *grammar;        /* a grammar in llguidance's Lark dialect */
} sglang_request_params;

/* The outcome of a generation. Owned by the caller; free with sglang_result_free(). */
typedef struct sglang_result {
    char *text;                 /* generated text, NUL-terminated (stop strings cut off) */
    size_t text_len;            /* bytes of `text` (the text itself may hold a NUL) */
    int32_t *tokens;            /* generated token ids (a stop token included) */
    size_t n_tokens;
    sglang_finish_reason finish_reason;
    int32_t matched_token;      /* the stop token when it ended generation, else -1 (also
                                   when a complete constraint ended it) */
    char *matched_text;         /* the stop string when it ended generation, else NULL */
    size_t prompt_tokens;
    size_t completion_tokens;
    size_t cached_tokens;       /* prompt tokens served from the prefix cache */
} sglang_result;

/* A piece of a streamed generation. Owned by the library; valid only during the callback
 * (or until the next sglang_request_next / sglang_request_free). */
typedef struct sglang_chunk {
    const char *text;           /* new text, NUL-terminated (may be empty; may hold a NUL:
                                   use text_len) */
    size_t text_len;            /* bytes of `text` */
    const int32_t *tokens;      /* new token ids */
    size_t n_tokens;
    sglang_finish_reason finish_reason; /* SGLANG_FINISH_NONE until the last chunk */
} sglang_chunk;

/* Called for each chunk of sglang_generate_stream(). Return 0 to continue, non-zero to
 * cancel the request (sglang_generate_stream then returns SGLANG_ERR_CANCELLED). Called on
 * the thread that called sglang_generate_stream(). */
typedef int (*sglang_stream_callback)(const sglang_chunk *chunk, void *user_data);

/* One chat message for sglang_apply_chat_template(). */
typedef struct sglang_chat_message {
    const char *role;           /* "system", "user", "assistant", ... (UTF-8) */
    const char *content;        /* UTF-8 */
} sglang_chat_message;

/* ------------------------------------------------------------------ version and errors */

/* The library's ABI version: (SGLANG_VERSION_MAJOR << 16) | SGLANG_VERSION_MINOR. */
uint32_t sglang_abi_version(void);

/* The library's version string, e.g. "1.0.0 (engine 0.1.0)". Static; do not free. */
const char *sglang_version_string(void);

/* SGLANG_OK if a caller built against header version major.minor can use this library;
 * SGLANG_ERR_VERSION if the major versions differ or the caller's minor is newer. */
sglang_status sglang_check_version(uint32_t major, uint32_t minor);

/* The message of the last failed call on this thread; "" if none, or if a later call that
 * reports a status (or sglang_tokenize / sglang_detokenize) succeeded. Owned by the library;
 * valid until the next sglang_* call on the same thread. Never NULL. */
const char *sglang_last_error(void);

/* Frees a string the library allocated. NULL is ignored. */
void sglang_string_free(char *s);

/* ------------------------------------------------------------------ engine */

/* Defaults for every field, struct_size set. */
sglang_engine_params sglang_engine_default_params(void);

/* Loads the model and starts the engine.
 * Returns SGLANG_OK and sets *out (free with sglang_engine_free);
 * SGLANG_ERR_INVALID_ARGUMENT (NULL params or out, missing model_path, a value out of range,
 * a struct_size inside a field, a KV pool the machine cannot hold);
 * SGLANG_ERR_VERSION (params->struct_size larger than this library knows);
 * SGLANG_ERR_LOAD (the model directory is missing or damaged). *out is NULL on failure. */
sglang_status sglang_engine_create(const sglang_engine_params *params, sglang_engine **out);

/* Stops the engine and frees it. Requests still running end with SGLANG_FINISH_ABORT; their
 * sglang_request objects stay valid until freed. NULL is ignored. In a forked child it returns
 * without doing anything (see fork() above). */
void sglang_engine_free(sglang_engine *engine);

/* ------------------------------------------------------------------ tokenizer */

/* Tokenizes `text` (NUL-terminated UTF-8) into `tokens` (room for `capacity` ids).
 * Returns the number of ids written; if `capacity` is too small, nothing is written and the
 * return value is minus the number needed; SGLANG_TOKENIZE_ERROR (INT32_MIN) for a NULL
 * engine or text, invalid UTF-8, or a NULL `tokens` with a non-zero capacity. */
int32_t sglang_tokenize(const sglang_engine *engine, const char *text, int32_t add_special_tokens,
                        int32_t *tokens, int32_t capacity);

/* Writes the text of `n_tokens` ids into `buf` (room for `capacity` bytes), NUL-terminated.
 * Returns the text length (without the NUL); if `capacity` is too small, nothing is written
 * and the return value is minus the bytes needed (including the NUL); SGLANG_TOKENIZE_ERROR
 * for a NULL engine, NULL tokens with n_tokens > 0, an id outside the vocabulary, or a NULL
 * `buf` with a non-zero capacity. */
int32_t sglang_detokenize(const sglang_engine *engine, const int32_t *tokens, size_t n_tokens,
                          int32_t skip_special_tokens, char *buf, int32_t capacity);

/* Renders messages through the model's chat template (with the assistant prompt appended if
 * add_generation_prompt). Sets *out to a new string (free with sglang_string_free).
 * Returns SGLANG_OK; SGLANG_ERR_INVALID_ARGUMENT (NULL arguments, invalid UTF-8, no chat
 * template, a template error). */
sglang_status sglang_apply_chat_template(const sglang_engine *engine, const sglang_chat_message *messages,
                                         size_t n_messages, int32_t add_generation_prompt, char **out);

/* ------------------------------------------------------------------ generation */

/* Defaults for every field, struct_size set (no prompt). */
sglang_request_params sglang_request_default_params(void);

/* Generates until a stop condition; blocks the calling thread. Sets *out (free with
 * sglang_result_free). Returns SGLANG_OK; SGLANG_ERR_INVALID_ARGUMENT (NULL arguments, no or
 * two prompts, invalid UTF-8, a sampling value out of range, a prompt longer than the
 * context); SGLANG_ERR_VERSION; SGLANG_ERR_QUEUE_FULL; SGLANG_ERR_ENGINE_STOPPED (the engine
 * stopped or failed); SGLANG_ERR_INTERNAL (the model step carrying the request failed). */
sglang_status sglang_generate(sglang_engine *engine, const sglang_request_params *params, sglang_result **out);

/* Like sglang_generate, calling `callback` with each chunk as it is produced. `out` may be
 * NULL; otherwise it receives the whole result (also when cancelled). Returns what
 * sglang_generate returns, or SGLANG_ERR_CANCELLED when the callback returned non-zero or the
 * request was aborted. */
sglang_status sglang_generate_stream(sglang_engine *engine, const sglang_request_params *params,
                                     sglang_stream_callback callback, void *user_data, sglang_result **out);

/* Frees a result. NULL is ignored. */
void sglang_result_free(sglang_result *result);

/* Starts a generation without blocking and sets *out (free with sglang_request_free). Returns
 * what sglang_generate returns. */
sglang_status sglang_request_start(sglang_engine *engine, const sglang_request_params *params, sglang_request **out);

/* Waits for the next chunk of `request` and fills *chunk (valid until the next call on this
 * request or its free). Returns SGLANG_OK (the last chunk has a finish_reason other than
 * SGLANG_FINISH_NONE); SGLANG_ERR_FINISHED once the last chunk was delivered;
 * SGLANG_ERR_INVALID_ARGUMENT for NULL; SGLANG_ERR_ENGINE_STOPPED when the engine stopped or
 * failed; SGLANG_ERR_INTERNAL when the model step carrying the request failed. One thread at a
 * time. */
sglang_status sglang_request_next(sglang_request *request, sglang_chunk *chunk);

/* Cancels `request` from any thread; its stream ends with SGLANG_FINISH_ABORT.
 * Returns SGLANG_OK; SGLANG_ERR_FINISHED if it had already finished; SGLANG_ERR_INVALID_ARGUMENT
 * for NULL. */
sglang_status sglang_request_abort(sglang_request *request);

/* Frees a request (cancelling it if it still runs). NULL is ignored. Not concurrently with
 * other calls on the same request. */
void sglang_request_free(sglang_request *request);

/* ------------------------------------------------------------------ observability */

/* The engine's metrics in the Prometheus text format. Sets *out (free with
 * sglang_string_free). Returns SGLANG_OK or SGLANG_ERR_INVALID_ARGUMENT. */
sglang_status sglang_metrics_text(const sglang_engine *engine, char **out);

#ifdef __cplusplus
}
#endif

#endif /* SGLANG_H */
