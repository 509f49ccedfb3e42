using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Qmp.Schema;

namespace Backup.Qmp.Tests;

public class InputValidatorTests
{
    private static readonly SchemaModel TestSchema = SchemaLoader.Load([("test.json", """
        {
          "module": "test", "doc": "test",
          "definitions": [
            { "enum": "Mode", "doc": "m", "data": ["on-success", "never"] },
            { "struct": "Inner", "doc": "i", "data": { "name": "str", "*size": "int" } },
            { "command": "t", "doc": "t",
              "data": { "node": "str", "*gran": "uint32", "*big": "uint64", "*speed": "int", "*flag": "bool",
                        "*mode": "Mode", "*inner": "Inner", "*list": ["Inner"] } }
          ]
        }
        """)]);

    private static StructType Args => TestSchema.Commands["t"].Arguments;

    private static string ErrorOf(string json, InputForm form = InputForm.Json)
    {
        var act = () => InputValidator.ValidateArguments(JsonNode.Parse(json)!.AsObject(), Args, form);
        return act.Should().Throw<BlockException>().Which.Message;
    }

    [Theory]
    [InlineData("""{}""", "Parameter 'node' is missing")]
    [InlineData("""{"node": 5}""", "Invalid parameter type for 'node', expected: string")]
    [InlineData("""{"node": "a", "bogus": 1}""", "Parameter 'bogus' is unexpected")]
    [InlineData("""{"node": "a", "flag": "yes"}""", "Invalid parameter type for 'flag', expected: boolean")]
    [InlineData("""{"node": "a", "speed": 1.5}""", "Invalid parameter type for 'speed', expected: integer")]
    [InlineData("""{"node": "a", "speed": "fast"}""", "Invalid parameter type for 'speed', expected: integer")]
    [InlineData("""{"node": "a", "gran": 4294967296}""", "Parameter 'gran' expects uint32_t")]
    [InlineData("""{"node": "a", "gran": -1}""", "Parameter 'gran' expects uint32_t")]
    [InlineData("""{"node": "a", "gran": "65536"}""", "Parameter 'gran' expects uint64")]
    [InlineData("""{"node": "a", "gran": 65536.0}""", "Parameter 'gran' expects uint64")]
    [InlineData("""{"node": "a", "gran": null}""", "Parameter 'gran' expects uint64")]
    [InlineData("""{"node": "a", "gran": [65536]}""", "Parameter 'gran' expects uint64")]
    [InlineData("""{"node": "a", "mode": "sometimes"}""", "Parameter 'mode' does not accept value 'sometimes'")]
    [InlineData("""{"node": "a", "mode": 1}""", "Invalid parameter type for 'mode', expected: string")]
    [InlineData("""{"node": "a", "inner": {}}""", "Parameter 'inner.name' is missing")]
    [InlineData("""{"node": "a", "inner": {"name": "x", "zz": 1}}""", "Parameter 'inner.zz' is unexpected")]
    [InlineData("""{"node": "a", "inner": []}""", "Invalid parameter type for 'inner', expected: object")]
    [InlineData("""{"node": "a", "list": {}}""", "Invalid parameter type for 'list', expected: array")]
    [InlineData("""{"node": "a", "list": [5]}""", "Invalid parameter type for 'list[0]', expected: object")]
    [InlineData("""{"node": "a", "list": [{"name": 1}]}""", "Invalid parameter type for 'list[0].name', expected: string")]
    [InlineData("""{"node": "a", "list": [{}]}""", "Parameter 'list[0].name' is missing")]
    public void Rejects_bad_input_with_QEMUs_words(string json, string expected) =>
        ErrorOf(json).Should().Be(expected);

    [Fact]
    public void Reports_members_in_declaration_order_and_unexpected_ones_last()
    {
        ErrorOf("""{"bogus": 1, "speed": "x"}""").Should().Be("Parameter 'node' is missing");
        ErrorOf("""{"bogus": 1, "node": "a", "speed": "x"}""").Should().Be("Invalid parameter type for 'speed', expected: integer");
    }

    [Fact]
    public void Key_value_form_gives_strings_their_schema_types()
    {
        var r = InputValidator.ValidateArguments(new JsonObject
        {
            ["node"] = "a", ["gran"] = "65536", ["flag"] = "on", ["speed"] = "0x10",
            ["list"] = new JsonObject { ["0"] = new JsonObject { ["name"] = "x", ["size"] = "-3" } },
        }, Args, InputForm.KeyValue);
        r["gran"]!.GetValue<long>().Should().Be(65536);
        r["flag"]!.GetValue<bool>().Should().BeTrue();
        r["speed"]!.GetValue<long>().Should().Be(16);
        r["list"]![0]!["size"]!.GetValue<long>().Should().Be(-3);
        ErrorOf("""{"node": "a", "flag": "maybe"}""", InputForm.KeyValue).Should().Be("Parameter 'flag' expects 'on' or 'off'");
        ErrorOf("""{"node": "a", "speed": "abc"}""", InputForm.KeyValue).Should().Be("Parameter 'speed' expects integer");
    }

    [Fact]
    public void Blockdev_options_follow_the_union_and_its_alternates()
    {
        var add = SchemaLoader.Default.Commands["blockdev-add"].Arguments;
        string Err(string json) => FluentActions.Invoking(() => InputValidator.ValidateArguments(JsonNode.Parse(json)!.AsObject(), add))
            .Should().Throw<BlockException>().Which.Message;
        Err("""{"node-name": "x"}""").Should().Be("Parameter 'driver' is missing");
        Err("""{"driver": "nosuch"}""").Should().Be("Parameter 'driver' does not accept value 'nosuch'");
        // QSD names a nested enum member alone.
        Err("""{"driver": "qcow2", "node-name": "x", "file": {"driver": "bogus"}}""").Should().Be("Parameter 'driver' does not accept value 'bogus'");
        Err("""{"driver": "raw", "node-name": "r", "file": {"driver": "file"}}""").Should().Be("Parameter 'file.filename' is missing");
        Err("""{"driver": "raw", "node-name": "r", "file": 5}""").Should().Be("Invalid parameter type for 'file', expected: BlockdevRef");
        Err("""{"driver": "file", "node-name": "f", "filename": "x", "offset": 1}""").Should().Be("Parameter 'offset' is unexpected");
        var ok = InputValidator.ValidateArguments(JsonNode.Parse("""{"driver":"qcow2","node-name":"q","file":"f0","backing":null}""")!.AsObject(), add);
        ok.ContainsKey("backing").Should().BeTrue();
        ok["backing"].Should().BeNull();
    }
}
