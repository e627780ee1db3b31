from twisted.application.service import ServiceMaker

llmgateMock = ServiceMaker(
    "llmgate-mock", "llmgate.mock.tap", "Mock OpenAI/Anthropic provider", "llmgate-mock"
)
