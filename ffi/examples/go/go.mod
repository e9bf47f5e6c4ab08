module sglang-example

go 1.19
