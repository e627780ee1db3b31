from twisted.application.service import ServiceMaker

llmgateMock = ServiceMaker(
    "llmgate-mock", "llmgate.mock_tap", "Mock OpenAI/Anthropic provider", "llmgate-mock"
)
