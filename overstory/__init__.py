"""overstory: LLM agent conversations served on Ray the way OTP serves processes.

import overstory

agent = overstory.Agent("helper", instructions="Be brief.", model="offline:echo",
                        tools=[add])
rt = overstory.connect(agent, store="sqlite:///chat.db")
conv = rt.conversation("alice")
print(conv.send("hello").text)
"""

from .agent import Agent, Placement
from .app import App, AppLoadError
from .context import RunContext
from .exceptions import (
    AllModelsFailed,
    ClusterAuthRefused,
    ClusterUnavailable,
    ConfigError,
    ConversationQuarantined,
    ConversationUnavailable,
    DataKeyError,
    Fenced,
    InvalidMessage,
    InvalidUserId,
    JobFailed,
    MaxRoundTripsExceeded,
    ModelError,
    ModelErrorKind,
    OverstoryError,
    Passivated,
    QuotaExceeded,
    RuntimeFailure,
    SequenceConflict,
    StoreError,
    StoreUnavailable,
    StoreURLError,
    ToolDefinitionError,
    TurnFailed,
    TurnIncomplete,
    UnknownAgent,
    UnknownJob,
    UnknownTurn,
    UsageError,
)
from .messages import (
    AssistantMessage,
    Message,
    ModelResponse,
    Reply,
    ToolCall,
    ToolReturn,
    TurnEvent,
    Usage,
    UserMessage,
)
from .providers import (
    BreakerPolicy,
    Endpoint,
    FallbackModel,
    Limits,
    Model,
    OfflineModel,
    RetryPolicy,
    Rule,
    Secret,
)
from .runtime import Config, Conversation, Job, Runtime, connect, load_config
from .tools import Tool, ToolDefinition

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AllModelsFailed",
    "App",
    "AppLoadError",
    "AssistantMessage",
    "BreakerPolicy",
    "ClusterAuthRefused",
    "ClusterUnavailable",
    "Config",
    "ConfigError",
    "Conversation",
    "ConversationQuarantined",
    "ConversationUnavailable",
    "DataKeyError",
    "Endpoint",
    "FallbackModel",
    "Fenced",
    "InvalidMessage",
    "InvalidUserId",
    "Job",
    "JobFailed",
    "Limits",
    "MaxRoundTripsExceeded",
    "Message",
    "Model",
    "ModelError",
    "ModelErrorKind",
    "ModelResponse",
    "OfflineModel",
    "OverstoryError",
    "Passivated",
    "Placement",
    "QuotaExceeded",
    "Reply",
    "RetryPolicy",
    "Rule",
    "RunContext",
    "Runtime",
    "RuntimeFailure",
    "Secret",
    "SequenceConflict",
    "StoreError",
    "StoreURLError",
    "StoreUnavailable",
    "Tool",
    "ToolCall",
    "ToolDefinition",
    "ToolDefinitionError",
    "ToolReturn",
    "TurnEvent",
    "TurnFailed",
    "TurnIncomplete",
    "UnknownAgent",
    "UnknownJob",
    "UnknownTurn",
    "Usage",
    "UsageError",
    "UserMessage",
    "connect",
    "load_config",
]
