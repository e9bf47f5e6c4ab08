// A C++ program using libsglang through the RAII wrapper in sglang.hpp.
//
//   g++ -std=c++17 -Wall -Wextra -Werror -I include -I ffi/examples/cpp ffi/examples/cpp/main.cpp -L target/release -lsglang
//   ./a.out MODEL_DIR "PROMPT" MAX_NEW_TOKENS
#include <cstdlib>
#include <iostream>

#include "sglang.hpp"

int main(int argc, char **argv) {
    if (argc != 4) {
        std::cerr << "usage: " << argv[0] << " MODEL_DIR PROMPT MAX_NEW_TOKENS\n";
        return 2;
    }
    try {
        sglang::Engine engine(argv[1], 4096);
        sglang_request_params p = sglang_request_default_params();
        p.text = argv[2];
        p.max_new_tokens = std::atoi(argv[3]);
        p.temperature = 0.0f;
        sglang::Result r = engine.generate(p);
        std::cout << "TOKENS";
        for (int32_t t : r.tokens) {
            std::cout << ' ' << t;
        }
        std::cout << "\nFINISH " << static_cast<int>(r.finish_reason) << "\nTEXT_BEGIN\n" << r.text << "\nTEXT_END\n";
        std::string streamed;
        size_t chunks = 0;
        engine.stream(p, [&](const std::string &piece) {
            streamed += piece;
            chunks++;
            return true;
        });
        std::cout << "STREAM_CHUNKS " << chunks << "\nSTREAM_BEGIN\n" << streamed << "\nSTREAM_END\n";
        return streamed == r.text ? 0 : 3;
    } catch (const sglang::Error &e) {
        std::cerr << e.what() << '\n';
        return 1;
    }
}
