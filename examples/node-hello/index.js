exports.handler = async (event, context) => {
  const name = (event && event.name) || 'world';
  console.log(`greeting ${name}`); // goes to the function's logs
  return {
    message: `Hello, ${name}!`,
    function: context.functionName,
    request_id: context.awsRequestId,
  };
};
