# No __init__.py lives in twisted/plugins: Twisted would then skip the directory.
from twisted.application.service import ServiceMaker

llmgate = ServiceMaker("llmgate", "llmgate.tap", "LLM API gateway", "llmgate")
