//! The schema of the commands the server answers itself: `qmp_capabilities`, `query-commands`
//! and `query-qmp-schema` (with QEMU's `SchemaInfo` types, `qapi/introspect.json`).

use crate::schema::{Command, Enum, Member, Object, Type, Values, Variants, EMPTY};

const STR_LIST: Type = Type::Array(&Type::Str);

static QMP_CAPABILITY: Enum = Enum {
    name: "QMPCapability",
    values: Values::List(&["oob"]),
};

/// `qmp_capabilities`.
pub static QMP_CAPABILITIES: Command = Command {
    name: "qmp_capabilities",
    args: &[Member::opt(
        "enable",
        Type::Array(&Type::Enum(&QMP_CAPABILITY)),
    )],
    boxed: None,
    ret: EMPTY,
};

static COMMAND_INFO: Object = Object {
    name: "CommandInfo",
    members: &[Member::req("name", Type::Str)],
    variants: None,
};

/// `query-commands`.
pub static QUERY_COMMANDS: Command = Command {
    name: "query-commands",
    args: &[],
    boxed: None,
    ret: Type::Array(&Type::Object(&COMMAND_INFO)),
};

static SCHEMA_META_TYPE: Enum = Enum {
    name: "SchemaMetaType",
    values: Values::List(&[
        "builtin",
        "enum",
        "array",
        "object",
        "alternate",
        "command",
        "event",
    ]),
};

static JSON_TYPE: Enum = Enum {
    name: "JSONType",
    values: Values::List(&[
        "string", "number", "int", "boolean", "null", "object", "array", "value",
    ]),
};

static SCHEMA_INFO_BUILTIN: Object = Object {
    name: "SchemaInfoBuiltin",
    members: &[Member::req("json-type", Type::Enum(&JSON_TYPE))],
    variants: None,
};

static SCHEMA_INFO_ENUM_MEMBER: Object = Object {
    name: "SchemaInfoEnumMember",
    members: &[
        Member::req("name", Type::Str),
        Member::opt("features", STR_LIST),
    ],
    variants: None,
};

static SCHEMA_INFO_ENUM: Object = Object {
    name: "SchemaInfoEnum",
    members: &[
        Member::req(
            "members",
            Type::Array(&Type::Object(&SCHEMA_INFO_ENUM_MEMBER)),
        ),
        Member::req("values", STR_LIST),
    ],
    variants: None,
};

static SCHEMA_INFO_ARRAY: Object = Object {
    name: "SchemaInfoArray",
    members: &[Member::req("element-type", Type::Str)],
    variants: None,
};

static SCHEMA_INFO_OBJECT_MEMBER: Object = Object {
    name: "SchemaInfoObjectMember",
    members: &[
        Member::req("name", Type::Str),
        Member::req("type", Type::Str),
        Member::opt("default", Type::Any),
        Member::opt("features", STR_LIST),
    ],
    variants: None,
};

static SCHEMA_INFO_OBJECT_VARIANT: Object = Object {
    name: "SchemaInfoObjectVariant",
    members: &[
        Member::req("case", Type::Str),
        Member::req("type", Type::Str),
    ],
    variants: None,
};

static SCHEMA_INFO_OBJECT: Object = Object {
    name: "SchemaInfoObject",
    members: &[
        Member::req(
            "members",
            Type::Array(&Type::Object(&SCHEMA_INFO_OBJECT_MEMBER)),
        ),
        Member::opt("tag", Type::Str),
        Member::opt(
            "variants",
            Type::Array(&Type::Object(&SCHEMA_INFO_OBJECT_VARIANT)),
        ),
    ],
    variants: None,
};

static SCHEMA_INFO_ALTERNATE_MEMBER: Object = Object {
    name: "SchemaInfoAlternateMember",
    members: &[Member::req("type", Type::Str)],
    variants: None,
};

static SCHEMA_INFO_ALTERNATE: Object = Object {
    name: "SchemaInfoAlternate",
    members: &[Member::req(
        "members",
        Type::Array(&Type::Object(&SCHEMA_INFO_ALTERNATE_MEMBER)),
    )],
    variants: None,
};

static SCHEMA_INFO_COMMAND: Object = Object {
    name: "SchemaInfoCommand",
    members: &[
        Member::req("arg-type", Type::Str),
        Member::req("ret-type", Type::Str),
        Member::opt("allow-oob", Type::Bool),
    ],
    variants: None,
};

static SCHEMA_INFO_EVENT: Object = Object {
    name: "SchemaInfoEvent",
    members: &[Member::req("arg-type", Type::Str)],
    variants: None,
};

static SCHEMA_INFO: Object = Object {
    name: "SchemaInfo",
    members: &[
        Member::req("name", Type::Str),
        Member::req("meta-type", Type::Enum(&SCHEMA_META_TYPE)),
        Member::opt("features", STR_LIST),
    ],
    variants: Some(Variants {
        tag: "meta-type",
        cases: &[
            ("builtin", &SCHEMA_INFO_BUILTIN),
            ("enum", &SCHEMA_INFO_ENUM),
            ("array", &SCHEMA_INFO_ARRAY),
            ("object", &SCHEMA_INFO_OBJECT),
            ("alternate", &SCHEMA_INFO_ALTERNATE),
            ("command", &SCHEMA_INFO_COMMAND),
            ("event", &SCHEMA_INFO_EVENT),
        ],
    }),
};

/// `query-qmp-schema`.
pub static QUERY_QMP_SCHEMA: Command = Command {
    name: "query-qmp-schema",
    args: &[],
    boxed: None,
    ret: Type::Array(&Type::Object(&SCHEMA_INFO)),
};

/// The server's own commands, in the order `query-commands` lists them.
pub(crate) const BUILTIN_COMMANDS: [&Command; 3] =
    [&QMP_CAPABILITIES, &QUERY_COMMANDS, &QUERY_QMP_SCHEMA];
