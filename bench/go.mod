module llmgate/bench

go 1.19
